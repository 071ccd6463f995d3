"""`ling_jax.config.LingConfig`: Hugging Face round trip and validation."""

from __future__ import annotations

import json

import pytest

from ling_jax import AttentionImpl, ConfigError, GmmImpl, LingConfig, get_config


def _fixture_dict(fixture_dir):
    return json.loads((fixture_dir / "config.json").read_text())


def test_round_trip_keeps_every_key_and_value(fixture_dir):
    d = _fixture_dict(fixture_dir)
    cfg = LingConfig.from_hf_dict(d)
    assert cfg.num_experts == 8 and cfg.first_k_dense_replace == 1 and cfg.head_dim == 16
    assert cfg.norm_head and not cfg.use_bias and cfg.rope_theta == 600000.0
    assert cfg.to_hf_dict() == d
    assert json.loads(json.dumps(cfg.to_hf_dict())) == d  # JSON-serialisable


def test_runtime_fields_stay_out_of_config_json(fixture_dir):
    cfg = LingConfig.from_hf_dict(_fixture_dict(fixture_dir), attention_impl="xla", gmm_impl="reference")
    assert cfg.attention_impl is AttentionImpl.XLA and cfg.gmm_impl is GmmImpl.REFERENCE
    out = cfg.to_hf_dict()
    assert not {"attention_impl", "gmm_impl", "remat", "extra"} & set(out)
    hash(cfg)  # usable as a static jit argument


def test_rope_scaling_round_trip(fixture_dir):
    d = dict(_fixture_dict(fixture_dir), rope_scaling={"type": "linear", "factor": 2.0})
    cfg = LingConfig.from_hf_dict(d)
    assert cfg.rope_scaling_dict == {"type": "linear", "factor": 2.0}
    assert cfg.to_hf_dict() == d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"model_type": "llama"}, "bailing_moe"),
        ({"first_k_dense_replace": 7}, "first_k_dense_replace"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ],
)
def test_invalid_configs_name_the_key(fixture_dir, change, message):
    with pytest.raises(ConfigError, match=message):
        LingConfig.from_hf_dict(dict(_fixture_dict(fixture_dir), **change))


def test_missing_required_keys_are_listed(fixture_dir):
    d = _fixture_dict(fixture_dir)
    del d["hidden_size"], d["num_experts"]
    with pytest.raises(ConfigError, match="hidden_size, num_experts"):
        LingConfig.from_hf_dict(d)


def test_replace_validates():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        get_config("tiny").replace(num_attention_heads=5)
