"""`ling_jax.train.metrics`: FLOPs per token against a hand count, the jsonl writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ling_jax
from ling_jax.train.metrics import MetricsWriter, flops_per_token


def test_flops_per_token_of_tiny_by_hand():
    # tiny: D 64, 3 layers (1 dense), N 4 / K 2 heads of 16, dense ffn 160, 8 experts top-2 of ffn 32,
    # 2 shared (one MLP of width 64), untied lm_head over a vocab of 512.
    attention = 64 * 4 * 16 + 2 * (64 * 2 * 16) + 4 * 16 * 64  # q, k, v, o = 12288
    norms = 2 * 64
    dense_layer = attention + norms + 3 * 64 * 160
    moe_layer = attention + norms + 64 * 8 + 2 * (3 * 64 * 32) + 3 * 64 * 64  # router, 2 routed, shared
    matmul_params = dense_layer + 2 * moe_layer + 64 + 64 * 512  # + final norm + lm_head; embedding is a lookup
    assert matmul_params == 150976
    T = 128
    expected = 6 * matmul_params + 6 * 3 * T * 4 * 16  # causal attention: QK^T and PV, fwd and bwd, halved
    assert flops_per_token(ling_jax.get_config("tiny"), T) == expected == 1053312


def test_flops_per_token_of_ling_lite_is_six_times_active():
    cfg = ling_jax.get_config("ling_lite")
    _, active = ling_jax.count_params(cfg)
    per_token = flops_per_token(cfg, 4096)
    attention = 6 * 28 * 4096 * 16 * 128
    assert per_token == pytest.approx(6 * (active - 126464 * 2048) + attention)
    assert 2.0e9 < per_token / 6 < 2.75e9  # between the non-embedding and the total active counts


def test_writer_appends_plain_json_rows(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(3, {"loss": np.float32(2.5), "expert_load": np.array([[0.25, 0.75]])})
    writer.write(4, {"loss": 2.0})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 3, "loss": 2.5, "expert_load": [[0.25, 0.75]]}, {"step": 4, "loss": 2.0}]
    assert any((tmp_path / "tensorboard").iterdir())


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(str(tmp_path / "w"), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "w").exists()
