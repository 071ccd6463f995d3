"""Training throughput of `configs/bench_cpu.py`: tokens/s and MFU against a dense matmul timed in the same run.

    python benchmarks/bench_train.py [--steps 20] [--config configs/bench_cpu.py]

The model and batch are those of the config (synthetic data). MFU is the
model's training FLOP rate (6 x active non-embedding params + attention, per
token) divided by the FLOP rate of a dense float32 matmul measured here.
The original PyTorch implementation is not installed on these machines, so
there is no reference row: a figure carried from another run (the old
"~70 tokens/s") is not a measurement of this one.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ling_jax  # noqa: E402
from ling_jax.data import pipeline as data_lib  # noqa: E402
from ling_jax.train.metrics import flops_per_token, measure_peak_flops  # noqa: E402
from ling_jax.train.optim import make_optimizer, make_schedule  # noqa: E402
from ling_jax.train.step import LossConfig, init_train_state, train_step  # noqa: E402
from train import model_from_config  # noqa: E402


def _load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_cpu.py"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    args = parser.parse_args()
    cfg = _load_config(args.config)

    model = model_from_config(cfg)
    optimizer = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule))
    state = init_train_state(ling_jax.init_params(model, jax.random.key(cfg.seed)), optimizer)
    step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer,
                                     loss_cfg=LossConfig(**dict(cfg.loss))), donate_argnums=0)
    it = data_lib.make_train_iterator(cfg.data, tokenizer=None, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                      seed=cfg.seed)
    batches = [next(it) for _ in range(args.steps + 3)]
    for b in batches[:3]:
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for b in batches[3:]:
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t) / args.steps

    dense = measure_peak_flops(2048)
    tokens = cfg.batch_size * cfg.seq_len
    tps = tokens / seconds
    flops = tps * flops_per_token(model.config, cfg.seq_len)
    total, active = ling_jax.count_params(model.config)
    print(f"config {os.path.relpath(args.config, ROOT)}: {total / 1e6:.1f}M params ({active / 1e6:.1f}M active), "
          f"batch {cfg.batch_size} x {cfg.seq_len}, {jax.device_count()} {jax.default_backend()} device(s), "
          f"gmm {model.config.gmm_impl.value}, loss {float(np.asarray(metrics['loss'])):.3f}")
    print("| metric | value |")
    print("| --- | --- |")
    print(f"| step time | {seconds * 1e3:.0f} ms |")
    print(f"| tokens/s | {tps:,.0f} |")
    print(f"| model GFLOP/s (6N + attention) | {flops / 1e9:.1f} |")
    print(f"| dense f32 matmul GFLOP/s (same run) | {dense / 1e9:.1f} |")
    print(f"| MFU vs dense matmul | {flops / dense:.1%} |")
    print(f"| vs target 500 tokens/s | {tps / 500:.2f}x |")
    print("| vs reference PyTorch | not run (not installed) |")


if __name__ == "__main__":
    main()
