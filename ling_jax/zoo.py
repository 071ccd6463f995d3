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

# Ling-mini-2.0 (inclusionAI/Ling-mini-2.0 config.json; the same values are the defaults of the
# BailingMoeV2Config mirrored in NVIDIA NeMo AutoModel): 16.26B total, 1.43B active (789M non-embedding).
_LING_MINI_2 = dict(
    model_type="bailing_moe_v2", vocab_size=157184, hidden_size=2048, intermediate_size=5120,
    moe_intermediate_size=512, num_hidden_layers=20, first_k_dense_replace=1, num_attention_heads=16,
    num_key_value_heads=4, head_dim=128, num_experts=256, num_experts_per_tok=8, num_shared_experts=1,
    n_group=8, topk_group=4, routed_scaling_factor=2.5, moe_router_enable_expert_bias=True, norm_topk_prob=True,
    norm_head=False, use_bias=False, use_qkv_bias=False, use_qk_norm=True, partial_rotary_factor=0.5,
    rms_norm_eps=1e-6, rope_theta=600000.0, max_position_embeddings=32768, tie_word_embeddings=False,
    pad_token_id=156892, eos_token_id=156892, num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.1,
)

# Shapes of Ling-flash-2.0 and Ling-1T as recalled from their config.json files: not confirmed here (no copy
# of those files was found; the zoo table says so). Their counts by eval_shape are checked against the model
# cards (100B / 6.1B and ~1T / ~50B).
_LING_FLASH_2 = dict(
    _LING_MINI_2, hidden_size=4096, intermediate_size=9216, moe_intermediate_size=1024, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=4,
)
_LING_1T = dict(
    _LING_MINI_2, hidden_size=8192, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=80,
    first_k_dense_replace=4, num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
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
    "ling_mini_2_0": _LING_MINI_2,
    "ling_flash_2_0": _LING_FLASH_2,
    "ling_1t": _LING_1T,
    "ring_mini_2_0": _LING_MINI_2,  # Ring-mini-2.0: the reasoning model trained from Ling-mini-base-2.0, same shapes
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
