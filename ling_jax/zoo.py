"""The model zoo: named presets of the published Ling models, and parameter counts.

`python -m ling_jax` prints the zoo table (counts from `jax.eval_shape`, no
memory allocated).
"""

from __future__ import annotations

import math

import jax

from ling_jax.config import LingConfig
from ling_jax.convert import param_shapes

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


def _is_routed_expert(path: tuple) -> bool:
    keys = [getattr(p, "key", None) for p in path]
    return "moe_layers" in keys and keys[-2] == "mlp" and keys[-1] in ("gate_proj", "up_proj", "down_proj")


def count_params(config: LingConfig) -> tuple[int, int]:
    """`(total, active)` parameter counts from `jax.eval_shape` (no memory allocated).

    Active counts what one token touches: everything except the routed experts
    it is not sent to (embeddings and lm_head count as active).
    """
    total = routed = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(config)):
        n = math.prod(leaf.shape)
        total += n
        if _is_routed_expert(path):
            routed += n
    unused = routed * (config.num_experts - config.num_experts_per_tok) // max(config.num_experts, 1)
    return total, total - unused


def zoo_table() -> str:
    """A Markdown table of the presets with their counts."""
    rows = ["| name | layers | hidden | heads / kv | experts (top-k) + shared | total | active |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in list_models():
        c = get_config(name)
        total, active = count_params(c)
        rows.append(f"| {name} | {c.num_hidden_layers} | {c.hidden_size} | "
                    f"{c.num_attention_heads} / {c.num_key_value_heads} | {c.num_experts} "
                    f"({c.num_experts_per_tok}) + {c.num_shared_experts} | {_human(total)} | {_human(active)} |")
    return "\n".join(rows)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
