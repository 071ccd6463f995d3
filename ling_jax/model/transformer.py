"""The Ling (BailingMoe) causal language model as pure-functional Flax Linen modules.

Axis letters as in `ling_jax.model`.

Parameters (a plain pytree the caller owns)::

    embed/embedding                      [V, D]
    dense_layers/...                     [Ld, ...]  layers < first_k_dense_replace
    moe_layers/...                       [Lm, ...]  the MoE layers
    norm/scale                           [D]
    lm_head/kernel                       [D, V]     (absent when tied)

Each layer stack is one `nn.scan`, so compile time does not grow with depth.
A layer holds `input_norm`, `attention/{q,k,v,o}_proj`, `post_attention_norm`
and `mlp` (dense SwiGLU, or `MoE` with `router`, stacked experts
`gate_proj/up_proj [E, D, F]`, `down_proj [E, F, D]` and `shared_experts`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import LingConfig, Remat
from ling_jax.model.attention import Attention, ModelMode, fold_padding
from ling_jax.model.kv_cache import CacheSlot, KVCache, LayerCache
from ling_jax.model.layers import MLP, Dtype, Embed, LMHead, RMSNorm
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


class _CacheCarryingLayer(DecoderLayer):
    """`DecoderLayer` whose scan carries `(x, CacheSlot)`: the stack's cache is updated in place."""

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, CacheSlot], position_ids: jax.Array, segments: jax.Array,
                 cache_index: jax.Array | None, kv_valid: jax.Array | None) -> tuple[tuple[jax.Array, CacheSlot], None]:
        x, slot = carry
        x, slot = DecoderLayer.__call__(self, x, slot, position_ids, segments, cache_index, kv_valid)
        return (x, slot.next_layer()), None


def _layer_stack(config: LingConfig, moe: bool, length: int, mode: ModelMode, dtype: Dtype, param_dtype: Dtype,
                 name: str) -> nn.Module:
    """A scanned stack of `length` identical decoder layers (with a cache, carried: `_CacheCarryingLayer`)."""
    carried = mode is not ModelMode.FORWARD
    cls = _CacheCarryingLayer if carried else DecoderLayer
    if config.remat is not Remat.NONE:
        cls = nn.remat(cls, policy=_REMAT_POLICIES[config.remat], prevent_cse=False)
    scanned = nn.scan(
        cls,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 4 if carried else (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(config, moe, mode, dtype, param_dtype, name=name)


def default_positions(attention_mask: jax.Array | None, segment_ids: jax.Array | None,
                      shape: tuple[int, int], offset: jax.Array | int = 0) -> jax.Array:
    """Position ids [B, T] when the caller gives none.

    Left padding: `cumsum(mask) - 1` with pads set to 1 (as Hugging Face does);
    packed rows: positions restart at 0 at every segment start.
    """
    B, T = shape
    if segment_ids is not None:
        idx = jnp.broadcast_to(jnp.arange(T), (B, T))
        starts = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
        first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
        return idx - first
    if attention_mask is not None:
        pos = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
        return jnp.where(attention_mask.astype(bool), pos, 1)
    return jnp.broadcast_to(offset + jnp.arange(T), (B, T)).astype(jnp.int32)


class LingForCausalLM(nn.Module):
    """Ling MoE causal LM.

    Attributes:
      config: the architecture (and attention / grouped-matmul implementation choices).
      dtype: compute dtype.
      param_dtype: dtype of newly initialised parameters.
    """

    config: LingConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, dt, pd = self.config, self.dtype, self.param_dtype
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, cfg.norm_head, dt, pd)
        self.norm = RMSNorm(cfg.rms_norm_eps, dt, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = LMHead(cfg.vocab_size, cfg.norm_head, dt, pd)

    @nn.nowrap
    def _check(self, input_ids: jax.Array, cache: KVCache | None, mode: ModelMode | None) -> ModelMode:
        mode = ModelMode(mode) if mode is not None else (
            ModelMode.FORWARD if cache is None else ModelMode.DECODE)
        if (mode is ModelMode.FORWARD) != (cache is None):
            raise ValueError(f"mode {mode.value} {'needs' if cache is None else 'takes no'} cache")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
        return mode

    @nn.compact
    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                      cache: KVCache | None = None, mode: ModelMode | None = None,
                      ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B, T, D] (after the last RMSNorm) and the updated cache.

        With a cache (`mode` PREFILL or DECODE), `attention_mask` is [B, S] over
        the cache slots (1 = a real token is or will be at that slot) and
        segment ids are not supported.
        """
        mode = self._check(input_ids, cache, mode)
        B, T = input_ids.shape
        index = None if cache is None else cache.index
        if mode is ModelMode.FORWARD:
            segments = fold_padding(attention_mask, segment_ids, (B, T))
            kv_valid, start = None, 0
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported with a KV cache")
            S = cache.max_len
            kv_valid = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
            start = 0 if mode is ModelMode.PREFILL else index
            segments = jnp.where(jax.lax.dynamic_slice_in_dim(kv_valid, start, T, axis=1), 1, -1)
        if position_ids is None:  # with a cache the mask spans the cache slots: count from the write slot
            position_ids = default_positions(attention_mask if cache is None else None, segment_ids, (B, T), start)
        x = self.embed(input_ids)  # [B, T, D]
        new_stacks = {}
        for name, length, moe in self.config.stacks:
            # Created here, in the compact method, so that the (static) mode can differ per call.
            stack = _layer_stack(self.config, moe, length, mode, self.dtype, self.param_dtype, name=name)
            if cache is None:
                x, _ = stack(x, None, position_ids, segments, index, kv_valid)
            else:
                (x, slot), _ = stack((x, CacheSlot(cache.stacks[name], jnp.int32(0))), position_ids, segments,
                                     index, kv_valid)
                new_stacks[name] = slot.stack
        new_cache = None if cache is None else KVCache(new_stacks, jnp.asarray(start + T, jnp.int32))
        return self.norm(x), new_cache

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                 cache: KVCache | None = None, mode: ModelMode | None = None, deterministic: bool = True,
                 ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Float32 logits [B, T, V]; `(logits, new_cache)` when a cache is given.

        Args:
          input_ids: [B, T] int token ids.
          attention_mask: [B, T] 1 for real tokens, 0 for padding (left or right).
          position_ids: [B, T]; by default derived from the mask / segments.
          segment_ids: [B, T] packed-document ids; attention never crosses them.
          cache: a KV cache from `ling_jax.init_cache` (generation).
          mode: `ModelMode.PREFILL` or `DECODE` with a cache (default DECODE).
          deterministic: False in training (NormHead's norm is then a constant).
        """
        h, new_cache = self.hidden_states(input_ids, attention_mask, position_ids, segment_ids,
                                          cache=cache, mode=mode)
        if self.config.tie_word_embeddings:
            logits = self.embed.attend(h, deterministic)
        else:
            logits = self.lm_head(h, deterministic)
        return logits if cache is None else (logits, new_cache)
