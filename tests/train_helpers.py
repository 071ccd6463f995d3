"""Shared by the train.py tests: a tiny synthetic-data run config and the losses a run logged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default  # noqa: E402


def tiny_config(**changes):
    """A 2-layer model on synthetic data, 6 steps, checkpoints every 3; `changes` are dotted keys."""
    c = default.get_config()
    c.model_overrides.update(dict(num_hidden_layers=2, vocab_size=256, max_position_embeddings=64))
    c.data.vocab_size = 256
    c.data.synthetic_num_docs = 2000
    c.batch_size, c.seq_len, c.steps = 4, 32, 6
    c.log_every, c.checkpoint_every, c.eval_every, c.eval_batches = 1, 3, 3, 2
    c.peak_flops_per_device = 1e11
    c.loss.balance_loss_weight = 0.01
    c.loss.accumulation_steps = 2
    for key, value in changes.items():
        target = c
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    return c


def logged_losses(workdir):
    """`{step: loss}` from a workdir's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def kill_9_after_checkpoint(cmd: list[str], workdir: str, step: int, timeout: float) -> None:
    """Runs `cmd` (a train.py command line) and kills it with SIGKILL once checkpoint `step` exists in `workdir`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not os.path.isdir(os.path.join(workdir, "checkpoints", str(step))):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step))), "no checkpoint before the deadline"
