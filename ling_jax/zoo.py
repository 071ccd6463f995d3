"""The model zoo: named presets of the published Ling models.

`python -m ling_jax` prints the zoo table with parameter counts
(`ling_jax.cli.zoo`; counts from `ling_jax.model.params.count_params`).
"""

from __future__ import annotations

from ling_jax.config import LingConfig

_LING_LITE = dict(
    vocab_size=126464, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
    num_hidden_layers=28, first_k_dense_replace=0, num_attention_heads=16, num_key_value_heads=4,
    head_dim=128, num_experts=64, num_experts_per_tok=6, num_shared_experts=2, norm_topk_prob=True,
    norm_head=True, use_bias=False, use_qkv_bias=False, rms_norm_eps=1e-5, rope_theta=600000.0,
    max_position_embeddings=16384, tie_word_embeddings=False, pad_token_id=126081,
    eos_token_id=126081,
)

_PRESETS: dict[str, dict] = {
    # A test-sized model with every feature of the real ones (dense-first layer, shared experts).
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_experts=8, num_experts_per_tok=2, num_shared_experts=2, norm_topk_prob=True,
        norm_head=True, use_bias=False, use_qkv_bias=False, rms_norm_eps=1e-5, rope_theta=600000.0,
        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    ),
    "ling_lite": _LING_LITE,
    "ling_coder_lite": _LING_LITE,
    "ling_coder_lite_base": _LING_LITE,
    "ling_plus": dict(
        _LING_LITE, hidden_size=5376, intermediate_size=12288, moe_intermediate_size=3072,
        num_hidden_layers=88, num_attention_heads=56, num_key_value_heads=8, head_dim=96,
        num_experts_per_tok=4, num_shared_experts=1, rms_norm_eps=1e-6,
    ),
}


def list_models() -> list[str]:
    """Names of the presets."""
    return list(_PRESETS)


def get_config(name: str, **overrides) -> LingConfig:
    """The `LingConfig` of a preset, with optional field overrides.

    Raises:
      KeyError: unknown name (the message lists the known ones).
    """
    if name not in _PRESETS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(_PRESETS)}")
    return LingConfig(**{**_PRESETS[name], **overrides})
