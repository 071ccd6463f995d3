"""The Ling 2.0 presets: parameter counts by `jax.eval_shape` against the model cards (MTP layers excluded)."""

from __future__ import annotations

import pytest

import ling_jax
from ling_jax.model.params import count_params_detail


@pytest.mark.parametrize(("name", "total", "active", "active_non_embedding", "rel"), [
    ("ling_mini_2_0", 16.26e9, 1.43e9, 789e6, 0.005),  # model card: 16.26B / 1.43B / 789M
    ("ring_mini_2_0", 16.26e9, 1.43e9, 789e6, 0.005),
    ("ling_flash_2_0", 100e9, 6.1e9, 4.8e9, 0.03),  # "100B" / 6.1B / 4.8B (shapes unconfirmed, see the README)
    ("ling_1t", 1e12, 50e9, None, 0.03),  # "1T" / "about 50B"
])
def test_ling2_preset_counts_match_the_model_cards(name, total, active, active_non_embedding, rel):
    cfg = ling_jax.get_config(name)
    d = count_params_detail(cfg)
    assert cfg.model_type == "bailing_moe_v2" and d["mtp"] > 0
    assert d["total"] == pytest.approx(total, rel=rel) and d["active"] == pytest.approx(active, rel=rel)
    if active_non_embedding is not None:
        assert d["active_non_embedding"] == pytest.approx(active_non_embedding, rel=rel)
    assert ling_jax.count_params(cfg) == (d["total"], d["active"])
    assert d["total"] - d["total_non_embedding"] == 2 * cfg.vocab_size * cfg.hidden_size  # untied embed + lm_head
