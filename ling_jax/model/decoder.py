"""The decoder layer of the Ling models and its scanned stack (`nn.scan`), with rematerialisation.

Axis letters as in `ling_jax.model`. Used by the main layer stacks of
`ling_jax.model.transformer` and inside the multi-token-prediction layers of
`ling_jax.model.mtp`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import LingConfig, Remat
from ling_jax.model.attention import Attention, ModelMode
from ling_jax.model.kv_cache import CacheSlot, LayerCache
from ling_jax.model.layers import MLP, Dtype, RMSNorm
from ling_jax.model.moe import MoE

_REMAT_POLICIES = {
    Remat.FULL: jax.checkpoint_policies.nothing_saveable,
    Remat.DOTS: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: LingConfig
    moe: bool
    mode: ModelMode = ModelMode.FORWARD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: LayerCache | CacheSlot | None, position_ids: jax.Array,
                 segments: jax.Array, cache_index: jax.Array | None,
                 kv_valid: jax.Array | None) -> tuple[jax.Array, LayerCache | CacheSlot | None]:
        """One layer: [B, T, D] -> [B, T, D], and this layer's updated cache (None without one).

        Args:
          x: [B, T, D] hidden states.
          cache: this layer's keys and values [B, S, K, H], or its `CacheSlot` in the whole stack, or None.
          position_ids: [B, T].
          segments: [B, T] segment ids with padding folded in (`fold_padding`).
          cache_index: the slot the first token is written to (DECODE).
          kv_valid: [B, S] True for cache slots that hold (or will hold) a real token.
        """
        cfg, dt, pd = self.config, self.dtype, self.param_dtype
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        h = RMSNorm(cfg.rms_norm_eps, dt, pd, name="input_norm")(x)
        h, new_cache = Attention(cfg, dt, pd, name="attention")(
            h, position_ids, segments, cache, cache_index, kv_valid, self.mode)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, dt, pd, name="post_attention_norm")(x)
        if self.moe:
            h = MoE(cfg, dt, pd, decode=self.mode is ModelMode.DECODE, name="mlp")(h, token_mask=segments >= 0)
        else:
            h = MLP(cfg.intermediate_size, dt, pd, name="mlp")(h)
        return x + h, new_cache


def remat_layer(cls: type[nn.Module], config: LingConfig) -> type[nn.Module]:
    """`cls` wrapped with the rematerialisation policy of `config.remat` (unchanged for `Remat.NONE`)."""
    if config.remat is Remat.NONE:
        return cls
    return nn.remat(cls, policy=_REMAT_POLICIES[config.remat], prevent_cse=False)


class _CacheCarryingLayer(DecoderLayer):
    """`DecoderLayer` whose scan carries `(x, CacheSlot)`: the stack's cache is updated in place."""

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, CacheSlot], position_ids: jax.Array, segments: jax.Array,
                 cache_index: jax.Array | None, kv_valid: jax.Array | None) -> tuple[tuple[jax.Array, CacheSlot], None]:
        x, slot = carry
        x, slot = DecoderLayer.__call__(self, x, slot, position_ids, segments, cache_index, kv_valid)
        return (x, slot.next_layer()), None


def layer_stack(config: LingConfig, moe: bool, length: int, mode: ModelMode, dtype: Dtype, param_dtype: Dtype,
                name: str) -> nn.Module:
    """A scanned stack of `length` identical decoder layers (with a cache, carried: `_CacheCarryingLayer`)."""
    carried = mode is not ModelMode.FORWARD
    scanned = nn.scan(
        remat_layer(_CacheCarryingLayer if carried else DecoderLayer, config),
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 4 if carried else (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(config, moe, mode, dtype, param_dtype, name=name)
