"""Generation latency as the paper measures it (vLLM's `benchmark_latency`): TTFT, TPOT and end-to-end.

    python benchmarks/bench_latency.py [--batches 1 8] [--pairs 128/128 512/128 1024/256 2048/512]
                                       [--repeats 2] [--models moe dense dense2.5x]

Models, all float32 with random weights on the shapes of `configs/bench_cpu.py`
(context raised to fit the longest pair):
  * `moe`: the bench MoE model (16 experts top-4 + 2 shared);
  * `dense`: a dense model with the MoE model's active parameter count (every
    layer a SwiGLU MLP as wide as the MoE layer's active experts);
  * `dense2.5x`: a dense model with 2.5x the MoE model's active parameters (the
    paper's Ling-Coder-Lite against dense 7B models, scaled down);
  * the original PyTorch implementation: not run (it is not installed here;
    the table says so).
For every (batch, input/output) pair: TTFT is `generate` with one new token
(prefill plus the first sample), end-to-end is `generate` with all the new
tokens (no early stop), TPOT = (end-to-end - TTFT) / (new tokens - 1); each
the best of `--repeats` runs after a compile run. The weight-read bound of a
decode step is the bytes a step must read (the weights the batch's tokens use:
everything but the embedding table, with the expected number of distinct
experts per MoE layer for the batch, plus the KV cache) divided by the memory
bandwidth measured in the same run (a reduction over a 512 MB array).
Times are wall-clock on whatever else runs on the machine: compare ratios
within one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ling_jax  # noqa: E402
from configs import bench_cpu  # noqa: E402
from train import model_from_config  # noqa: E402

DEFAULT_PAIRS = ("128/128", "512/128", "1024/256", "2048/512")


def _seconds(run) -> float:
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def best_seconds(run, repeats: int) -> float:
    """Best wall time of `run()` over `repeats` calls after a first (compiling) one."""
    run()
    return min(_seconds(run) for _ in range(repeats))


def measure_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a float32 sum over a `mbytes` MB array (read once per run)."""
    a = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    return a.nbytes / best_seconds(lambda: f(a).block_until_ready(), repeats)


def bench_models(max_len: int) -> dict[str, ling_jax.LingForCausalLM]:
    """The MoE bench model and its two dense comparisons (module docstring)."""
    cfg = bench_cpu.get_config()
    cfg.model_overrides.max_position_embeddings = max_len
    moe = model_from_config(cfg)
    c = moe.config
    active_ffn = c.num_experts_per_tok * c.moe_intermediate_size + c.shared_intermediate_size
    # Same active parameters: the per-layer mean of the dense-first and MoE layers' FFN widths.
    dense_ffn = (c.first_k_dense_replace * c.intermediate_size
                 + (c.num_hidden_layers - c.first_k_dense_replace) * active_ffn) // c.num_hidden_layers
    dense = c.replace(first_k_dense_replace=c.num_hidden_layers, intermediate_size=dense_ffn)
    _, active = ling_jax.count_params(c)
    # 2.5x active: widen the dense FFN (3 D F weights per layer) until the count matches.
    per_unit = 3 * c.hidden_size * c.num_hidden_layers
    base = ling_jax.count_params(dense)[0] - per_unit * dense_ffn
    wide = dense.replace(intermediate_size=round((2.5 * active - base) / per_unit))
    make = lambda arch: ling_jax.LingForCausalLM(arch, dtype=moe.dtype, param_dtype=moe.param_dtype)  # noqa: E731
    return {"moe": moe, "dense": make(dense), "dense2.5x": make(wide)}


def step_bytes(config: ling_jax.LingConfig, batch: int, kv_slots: int) -> float:
    """Bytes one decode step must read (float32): used weights but the embedding table, and the KV cache."""
    total, _ = ling_jax.count_params(config)
    c = config
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace if c.num_experts else 0
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    routed = moe_layers * c.num_experts * expert
    distinct = c.num_experts * (1 - (1 - c.num_experts_per_tok / c.num_experts) ** batch) if moe_layers else 0
    weights = total - c.vocab_size * c.hidden_size - routed + moe_layers * distinct * expert
    cache = 2 * c.num_hidden_layers * batch * kv_slots * c.num_key_value_heads * c.head_dim
    return 4.0 * (weights + cache)


def time_generate(model, params, ids: jax.Array, new: int, repeats: int) -> float:
    """Best wall time of `generate` over `repeats` runs after a compile run."""
    return best_seconds(lambda: np.asarray(ling_jax.generate(model, params, ids, max_new_tokens=new,
                                                              eos_token_id=-1)), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="input/output token counts")
    parser.add_argument("--models", nargs="+", default=["moe", "dense", "dense2.5x"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    pairs = [tuple(int(n) for n in p.split("/")) for p in args.pairs]
    models = bench_models(max(i + o for i, o in pairs))
    unknown = set(args.models) - set(models)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {sorted(models)}")
    bandwidth = measure_bandwidth()
    print(f"{jax.device_count()} {jax.default_backend()} device(s); memory bandwidth {bandwidth / 1e9:.1f} GB/s "
          "(same run); the PyTorch reference: not installed, not run")
    for name in args.models:
        total, active = ling_jax.count_params(models[name].config)
        print(f"{name}: {total / 1e6:.1f}M params, {active / 1e6:.1f}M active")
    print("| model | batch | in/out | TTFT ms | TPOT ms | e2e s | tokens/s | TPOT / weight-read bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    tpot = {}
    for name in args.models:
        model = models[name]
        params = ling_jax.init_params(model, jax.random.key(0))
        for batch in args.batches:
            for n_in, n_out in pairs:
                ids = jax.random.randint(jax.random.key(1), (batch, n_in), 0, model.config.vocab_size)
                ttft = time_generate(model, params, ids, 1, args.repeats)
                e2e = time_generate(model, params, ids, n_out, args.repeats)
                tpot[name, batch, n_in] = per_token = (e2e - ttft) / (n_out - 1)
                bound = step_bytes(model.config, batch, n_in + n_out // 2) / bandwidth
                print(f"| {name} | {batch} | {n_in}/{n_out} | {ttft * 1e3:.0f} | {per_token * 1e3:.1f} | {e2e:.2f} "
                      f"| {batch * n_out / e2e:.0f} | {per_token / bound:.2f} |", flush=True)
        del params
    if {"moe", "dense2.5x"} <= set(args.models):
        ratios = [tpot["moe", b, i] / tpot["dense2.5x", b, i] for b in args.batches for i, _ in pairs]
        print(f"MoE TPOT / dense-2.5x TPOT: {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(batches {args.batches} x pairs {args.pairs})")


if __name__ == "__main__":
    main()
