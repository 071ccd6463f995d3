"""Self-speculative decoding with the MTP layer: acceptance rate and speed-up over plain greedy decoding.

    python benchmarks/bench_speculative.py [--workdir /tmp/ling_bench_mtp] [--train-steps 60]

Trains (once; a finished workdir is reused) a Ling 2.0 model with one MTP layer
at the shapes of `configs/bench_cpu.py` (vocab 8192, hidden 512, 4 layers, 16
experts top-4 in 4 groups) with `train.py` on its synthetic random walks, the
MTP loss and bias balancing; then decodes the same prompts with
`ling_jax.generate` (plain greedy) and with `speculative="mtp"`, checks that the
tokens are identical and prints, for batch 1 and 8: the acceptance rate (verify
steps whose draft was kept), tokens per main-model step, and the wall-clock
speed-up, all measured in this run (each timing the best of `--repeats`, after
a compile run).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ling_jax  # noqa: E402
from ling_jax.inference.speculative import generate_mtp  # noqa: E402

V2 = dict(model_type="bailing_moe_v2", n_group=4, topk_group=2, routed_scaling_factor=2.5,
          moe_router_enable_expert_bias=True, use_qk_norm=True, partial_rotary_factor=0.5, norm_head=False,
          num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.3)


def _config(steps: int):
    spec = importlib.util.spec_from_file_location("bench_cpu", os.path.join(ROOT, "configs", "bench_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model_overrides.update(V2)
    c.steps, c.batch_size, c.seq_len = steps, 8, 128
    c.schedule.warmup_steps, c.schedule.decay_steps, c.schedule.peak_value = 5, steps, 3e-3
    c.loss.balance_loss_weight, c.loss.bias_update_rate = 0.0, 1e-3
    c.checkpoint_every, c.log_every, c.eval_every, c.sample_tokens = steps, 10, 0, 0
    return c


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/ling_bench_mtp")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        import train

        train.run(_config(args.train_steps), args.workdir)
    model, params = ling_jax.from_pretrained(args.workdir)
    V = model.config.vocab_size
    print(f"model: {args.workdir} (bench_cpu shapes, Ling 2.0, 1 MTP layer), {args.new_tokens} new tokens, "
          f"prompts of {args.prompt_len} tokens (random walks like the training data)")
    print("| batch | acceptance | tokens per main step | greedy s | speculative s | speed-up | identical |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(1)
    for batch in (1, 8):
        start = rng.integers(0, V, (batch, 1))
        ids = jnp.asarray((start + np.cumsum(rng.integers(1, 4, (batch, args.prompt_len)), 1)) % V, jnp.int32)
        mask = jnp.ones_like(ids)
        plain = lambda: ling_jax.generate(model, params, ids, max_new_tokens=args.new_tokens, eos_token_id=-1)  # noqa: E731, B023
        spec = lambda: generate_mtp(model, params, ids, mask, jnp.int32(-1), jnp.int32(0),  # noqa: E731, B023
                                    max_new_tokens=args.new_tokens)
        t_plain, t_spec = _best(plain, args.repeats), _best(spec, args.repeats)
        out, accepted, steps = spec()
        same = bool(np.array_equal(np.asarray(out), np.asarray(plain())))
        acc, steps = int(accepted), int(steps)
        print(f"| {batch} | {acc / max(steps, 1):.2f} ({acc}/{steps}) | {(args.new_tokens - 1) / max(steps, 1):.2f} | "
              f"{t_plain:.3f} | {t_spec:.3f} | {t_plain / t_spec:.2f}x | {same} |")


if __name__ == "__main__":
    main()
