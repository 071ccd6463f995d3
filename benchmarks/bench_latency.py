"""Generation latency as the paper measures it (vLLM's `benchmark_latency`): TTFT, TPOT and end-to-end.

    python benchmarks/bench_latency.py [--batches 1 8] [--pairs 128/128 512/128 1024/256 2048/512]
                                       [--repeats 2] [--models moe dense dense2.5x] [--no-reference]

Models, all float32 with random weights on the shapes of `configs/bench_cpu.py`
(context raised to fit the longest pair):
  * `moe`: the bench MoE model (16 experts top-4 + 2 shared);
  * `dense`: a dense model with the MoE model's active parameter count (every
    layer a SwiGLU MLP as wide as the MoE layer's active experts);
  * `dense2.5x`: a dense model with 2.5x the MoE model's active parameters (the
    paper's Ling-Coder-Lite against dense 7B models, scaled down);
  * (d) `REFERENCE_ROW`: the PyTorch reference (`benchmarks/torch_reference.py`,
    an eager port of the original `modeling_bailing_moe.py` proven equal to it
    on the fixture goldens) running the `moe` model's weights, timed the same
    way with its Hugging Face-style `generate` (prefill, then one token per
    step through its KV cache); run when torch imports (`pip install -e
    ".[reference]"`, else a printed note), off with `--no-reference`. A last
    table gives ours / reference tokens/s for every batch and pair.
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

try:
    import torch

    from benchmarks import torch_reference
except ImportError as e:  # torch is the optional `reference` extra
    torch_reference, REFERENCE_MISSING = None, f"{e.name} is not installed (pip install -e \".[reference]\")"

REFERENCE_ROW = "(d) PyTorch reference (eager, HF structure)"
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


def time_reference(reference, ids: np.ndarray, new: int, repeats: int) -> float:
    """Best wall time of the PyTorch reference's `generate` (no early stop) over `repeats` runs after a first one."""
    prompt = torch.from_numpy(np.asarray(ids, np.int64))
    return best_seconds(lambda: torch_reference.generate(reference, prompt, max_new_tokens=new), repeats)


def print_row(name: str, config: ling_jax.LingConfig, batch: int, n_in: int, n_out: int, ttft: float, e2e: float,
              bandwidth: float) -> float:
    """Prints one latency row and returns its TPOT in seconds."""
    per_token = (e2e - ttft) / (n_out - 1)
    bound = step_bytes(config, batch, n_in + n_out // 2) / bandwidth
    print(f"| {name} | {batch} | {n_in}/{n_out} | {ttft * 1e3:.0f} | {per_token * 1e3:.1f} | {e2e:.2f} "
          f"| {batch * n_out / e2e:.0f} | {per_token / bound:.2f} |", flush=True)
    return per_token


def bench_reference(moe: ling_jax.LingForCausalLM, args: argparse.Namespace, pairs: list[tuple[int, int]],
                    bandwidth: float, e2e: dict) -> None:
    """Prints the reference's rows (the `moe` model's weights, the same prompts), then ours / reference tokens/s.

    `e2e` maps `(model name, batch, input length)` to end-to-end seconds; the reference's are added.
    """
    reference = torch_reference.from_ling(moe.config, ling_jax.init_params(moe, jax.random.key(0)))
    for batch in args.batches:
        for n_in, n_out in pairs:
            ids = np.asarray(jax.random.randint(jax.random.key(1), (batch, n_in), 0, moe.config.vocab_size))
            ttft = time_reference(reference, ids, 1, args.repeats)
            e2e[REFERENCE_ROW, batch, n_in] = time_reference(reference, ids, n_out, args.repeats)
            print_row(REFERENCE_ROW, moe.config, batch, n_in, n_out, ttft, e2e[REFERENCE_ROW, batch, n_in],
                      bandwidth)
    if "moe" in args.models:
        print()
        print("| batch | in/out | moe tokens/s | reference tokens/s | ours / reference |")
        print("| --- | --- | --- | --- | --- |")
        for batch in args.batches:
            for n_in, n_out in pairs:
                ours, ref = (batch * n_out / e2e[m, batch, n_in] for m in ("moe", REFERENCE_ROW))
                print(f"| {batch} | {n_in}/{n_out} | {ours:.0f} | {ref:.0f} | {ours / ref:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="input/output token counts")
    parser.add_argument("--models", nargs="+", default=["moe", "dense", "dense2.5x"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-reference", action="store_true", help=f"skip the row {REFERENCE_ROW!r}")
    args = parser.parse_args()
    pairs = [tuple(int(n) for n in p.split("/")) for p in args.pairs]
    models = bench_models(max(i + o for i, o in pairs))
    unknown = set(args.models) - set(models)
    if unknown:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {sorted(models)}")
    bandwidth = measure_bandwidth()
    if args.no_reference:
        reference_note = "not run (--no-reference)"
    elif torch_reference is None:
        reference_note = f"not run: {REFERENCE_MISSING}"
    else:
        reference_note = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"{jax.device_count()} {jax.default_backend()} device(s); memory bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"(same run); {REFERENCE_ROW}: {reference_note}")
    for name in args.models:
        total, active = ling_jax.count_params(models[name].config)
        print(f"{name}: {total / 1e6:.1f}M params, {active / 1e6:.1f}M active")
    print("| model | batch | in/out | TTFT ms | TPOT ms | e2e s | tokens/s | TPOT / weight-read bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    tpot, e2e = {}, {}
    for name in args.models:
        model = models[name]
        params = ling_jax.init_params(model, jax.random.key(0))
        for batch in args.batches:
            for n_in, n_out in pairs:
                ids = jax.random.randint(jax.random.key(1), (batch, n_in), 0, model.config.vocab_size)
                ttft = time_generate(model, params, ids, 1, args.repeats)
                e2e[name, batch, n_in] = time_generate(model, params, ids, n_out, args.repeats)
                tpot[name, batch, n_in] = print_row(name, model.config, batch, n_in, n_out, ttft,
                                                    e2e[name, batch, n_in], bandwidth)
        del params
    if torch_reference is not None and not args.no_reference:
        bench_reference(models["moe"], args, pairs, bandwidth, e2e)
    if {"moe", "dense2.5x"} <= set(args.models):
        ratios = [tpot["moe", b, i] / tpot["dense2.5x", b, i] for b in args.batches for i, _ in pairs]
        print(f"MoE TPOT / dense-2.5x TPOT: {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(batches {args.batches} x pairs {args.pairs})")


if __name__ == "__main__":
    main()
