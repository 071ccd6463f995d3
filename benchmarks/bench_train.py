"""Training throughput of `configs/bench_cpu.py`: tokens/s and MFU against a dense matmul timed in the same run.

    python benchmarks/bench_train.py [--steps 20] [--reference-steps 3] [--config configs/bench_cpu.py] [--profile]

The model and batch are those of the config (synthetic data). MFU is the
model's training FLOP rate (6 x active non-embedding params + attention, per
token) divided by the FLOP rate of a dense float32 matmul measured here.

The reference anchor is `benchmarks/torch_reference.py`, an eager PyTorch port
of the original `modeling_bailing_moe.py` (proven equal to it on the fixture
goldens by tests/test_torch_reference.py): it starts from the same weights,
takes the same batches' token ids (inputs and labels, the original's loss) and
does the same step (cross-entropy, backward, global-norm clipping, AdamW with
the config's hyperparameters and no decay on norms), in float32, timed over
`--reference-steps` steps after one warm-up step in the same run. It runs when
torch imports (`pip install -e ".[reference]"`); otherwise the table says why
not (`--reference-steps 0` skips it).

`--profile` traces two more steps with `jax.profiler` and prints where their
op time goes (attention, norms, router and permutes, expert and dense
matmuls, the vocabulary projection and loss, the rest, layout copies;
`benchmarks/profile_breakdown.py`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ling_jax  # noqa: E402
from benchmarks.profile_breakdown import breakdown, print_breakdown  # noqa: E402
from ling_jax.data import pipeline as data_lib  # noqa: E402
from ling_jax.train.metrics import flops_per_token, measure_peak_flops  # noqa: E402
from ling_jax.train.optim import make_optimizer, make_schedule  # noqa: E402
from ling_jax.train.step import LossConfig, init_train_state, train_step  # noqa: E402
from train import model_from_config  # noqa: E402

try:
    import torch

    from benchmarks import torch_reference
except ImportError as e:  # torch is the optional `reference` extra
    torch_reference, REFERENCE_MISSING = None, f"{e.name} is not installed (pip install -e \".[reference]\")"


def _load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def time_reference(cfg, model: ling_jax.LingForCausalLM, params, batches: list) -> tuple[float, float]:
    """Seconds per PyTorch reference train step over `batches[1:]` (after a warm-up on `batches[0]`), last loss."""
    reference = torch_reference.from_ling(model.config, params).train()
    o = cfg.optimizer
    optimizer = torch_reference.adamw(reference, lr=cfg.schedule.peak_value, b1=o.b1, b2=o.b2, eps=o.eps,
                                      weight_decay=o.weight_decay)
    ids = [torch.from_numpy(np.asarray(b["inputs"], np.int64)) for b in batches]
    torch_reference.train_step(reference, optimizer, ids[0], o.clip_norm)
    t = time.perf_counter()
    for x in ids[1:]:
        loss = torch_reference.train_step(reference, optimizer, x, o.clip_norm)
    return (time.perf_counter() - t) / (len(ids) - 1), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_cpu.py"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--reference-steps", type=int, default=3,
                        help="timed PyTorch reference steps (after 1 warm-up step); 0 skips the reference")
    parser.add_argument("--profile", action="store_true", help="print where a step's op time goes")
    args = parser.parse_args()
    cfg = _load_config(args.config)

    model = model_from_config(cfg)
    optimizer = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule))
    params = ling_jax.init_params(model, jax.random.key(cfg.seed))
    run_reference = torch_reference is not None and args.reference_steps > 0
    reference_params = jax.device_get(params) if run_reference else None  # the step donates the state
    state = init_train_state(params, optimizer)
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
    if args.profile:
        compiled = step.lower(state, batches[0]).compile()  # the executable traced, so its op names match
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir):
                for b in batches[:2]:
                    state, metrics = compiled(state, b)
                jax.block_until_ready(metrics)
            profile = breakdown(compiled.as_text(), trace_dir)

    if run_reference:
        ref_seconds, ref_loss = time_reference(cfg, model, reference_params, batches[:args.reference_steps + 1])
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
    if run_reference:
        ref_tps = tokens / ref_seconds
        print(f"| reference PyTorch step time (eager, HF structure; loss {ref_loss:.3f}) "
              f"| {ref_seconds * 1e3:.0f} ms |")
        print(f"| reference PyTorch tokens/s ({torch.get_num_threads()} threads) | {ref_tps:,.0f} |")
        print(f"| vs reference PyTorch (tokens/s ratio) | {tps / ref_tps:.2f}x |")
    else:
        why = REFERENCE_MISSING if torch_reference is None else "--reference-steps 0"
        print(f"| vs reference PyTorch | not run ({why}) |")
    if args.profile:
        print()
        print_breakdown(profile)


if __name__ == "__main__":
    main()
