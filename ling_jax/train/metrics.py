"""Run metrics: `metrics.jsonl`, TensorBoard event files, throughput and MFU.

Every logged step appends one JSON object to `WORKDIR/metrics.jsonl` with at
least `step`, `loss`, `learning_rate`, `grad_norm`, `tokens_per_second`, `mfu`
and `expert_load` (per MoE layer, the fraction of routed tokens each expert
received); evaluation adds `eval_loss`. The same scalars go to TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import LingConfig
from ling_jax.model.params import count_params


def flops_per_token(config: LingConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active non-embedding params + causal attention.

    The embedding lookup is free; the lm_head counts. Attention adds
    6 * L * T * N * H (QK^T and PV, forward and backward, halved for causality).
    """
    _, active = count_params(config)
    matmul_params = active - config.vocab_size * config.hidden_size  # the embedding table is a lookup
    attention = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6.0 * matmul_params + attention


def measure_peak_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a dense float32 matmul on the default device (the MFU denominator on CPU)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class MetricsWriter:
    """Appends metrics to `metrics.jsonl` and TensorBoard under `workdir` (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Logs one step's metrics (scalars and nested lists)."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _plain(value: Any) -> Any:
    """JSON-friendly Python value of an array or scalar."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        return arr.item()
    return np.round(arr.astype(np.float64), 6).tolist()
