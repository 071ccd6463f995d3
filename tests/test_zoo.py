"""`ling_jax.zoo`: presets and parameter counts by `jax.eval_shape`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ling_jax


def test_list_models():
    assert ling_jax.list_models() == ["tiny", "ling_lite", "ling_coder_lite", "ling_coder_lite_base",
                                      "ling_plus", "ling_mini_2_0", "ling_flash_2_0", "ling_1t", "ring_mini_2_0"]
    with pytest.raises(KeyError, match="known models: tiny"):
        ling_jax.get_config("ling_huge")


def test_ling_coder_lite_counts():
    total, active = ling_jax.count_params(ling_jax.get_config("ling_coder_lite"))
    assert round(total / 1e9, 1) == 16.8
    assert round(active / 1e9, 2) == 2.75


def test_ling_plus_counts():
    cfg = ling_jax.get_config("ling_plus")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps) == (88, 5376, 96, 1e-6)
    total, active = ling_jax.count_params(cfg)
    assert round(total / 1e9) == 291 or round(total / 1e9, -1) == 290
    assert 28.5e9 <= active <= 29.5e9


def test_tiny_count_matches_initialised_params():
    import jax
    import numpy as np

    cfg = ling_jax.get_config("tiny")
    params = ling_jax.init_params(ling_jax.LingForCausalLM(cfg), jax.random.key(0))
    total, active = ling_jax.count_params(cfg)
    assert total == sum(np.size(p) for p in jax.tree.leaves(params))
    E, k, D, F = cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    assert total - active == cfg.num_moe_layers * (E - k) * 3 * D * F


def test_zoo_command_prints_table():
    out = subprocess.run([sys.executable, "-m", "ling_jax"], capture_output=True, text=True, check=True)
    assert "| ling_coder_lite | 28 | 2048 | 16 / 4 | 64 (6) + 2 | 16.80B | 2.75B |" in out.stdout
