"""The Ling causal language model (BailingMoe v1 and Ling 2.0) as pure-functional Flax Linen modules.

Axis letters as in `ling_jax.model`.

Parameters (a plain pytree the caller owns)::

    embed/embedding                      [V, D]
    dense_layers/...                     [Ld, ...]  layers < first_k_dense_replace
    moe_layers/...                       [Lm, ...]  the MoE layers
    norm/scale                           [D]
    lm_head/kernel                       [D, V]     (absent when tied)
    mtp_layers/...                       [P, ...]   Ling 2.0 multi-token prediction (`ling_jax.model.mtp`)

Each layer stack is one `nn.scan`, so compile time does not grow with depth.
A layer holds `input_norm`, `attention/{q,k,v,o}_proj`, `post_attention_norm`
and `mlp` (dense SwiGLU, or `MoE` with `router`, stacked experts
`gate_proj/up_proj [E, D, F]`, `down_proj [E, F, D]` and `shared_experts`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import MTP_STACK, LingConfig
from ling_jax.model.attention import ModelMode, fold_padding
from ling_jax.model.decoder import layer_stack
from ling_jax.model.kv_cache import CacheSlot, KVCache
from ling_jax.model.layers import Dtype, Embed, LMHead, RMSNorm
from ling_jax.model.mtp import mtp_input_ids, mtp_stack, roll_left


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
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, cfg.norm_head, dt, pd, cfg.frozen_pad_embedding)
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

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                      position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                      cache: KVCache | None = None, mode: ModelMode | None = None,
                      ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B, T, D] (after the last RMSNorm) and the updated cache.

        With a cache (`mode` PREFILL or DECODE), `attention_mask` is [B, S] over
        the cache slots (1 = a real token is or will be at that slot) and
        segment ids are not supported.
        """
        h, new_cache, _ = self.forward_all(input_ids, attention_mask, position_ids, segment_ids, cache=cache,
                                           mode=mode)
        return h, new_cache

    @nn.compact
    def forward_all(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                    position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                    cache: KVCache | None = None, mode: ModelMode | None = None,
                    mtp_next_ids: jax.Array | None = None, main_hidden: jax.Array | None = None,
                    ) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
        """`hidden_states` plus the MTP layers' final hidden states [P, B, T, D] (`ling_jax.model.mtp`).

        Args:
          mtp_next_ids: [B, T], token t + 1 at position t (the first MTP layer's embedding input);
            None skips the MTP layers (their third output is then None). With a cache,
            the MTP layers read and write `cache.stacks[MTP_STACK]` (`init_cache(..., mtp=True)`).
          main_hidden: [B, T] final hidden states the main stack already computed for these tokens:
            only the MTP layers run (self-speculative decoding, `ling_jax.inference.speculative`).
          Others: as `hidden_states`.
        """
        cfg = self.config
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
        new_stacks = {} if cache is None else dict(cache.stacks)
        if main_hidden is None:
            x = self.embed(input_ids)  # [B, T, D]
            for name, length, moe in self.config.stacks:
                # Created here, in the compact method, so that the (static) mode can differ per call.
                stack = layer_stack(self.config, moe, length, mode, self.dtype, self.param_dtype, name=name)
                if cache is None:
                    x, _ = stack(x, None, position_ids, segments, index, kv_valid)
                else:  # the stack's cache is carried through the layer scan and written in place
                    (x, slot), _ = stack((x, CacheSlot(cache.stacks[name], jnp.int32(0))), position_ids,
                                         segments, index, kv_valid)
                    new_stacks[name] = slot.stack
            h = self.norm(x)
        else:
            h = main_hidden
        mtp_h = None
        if cfg.num_mtp_layers and (mtp_next_ids is not None or self.is_initializing()):
            ids = mtp_input_ids(input_ids if mtp_next_ids is None else mtp_next_ids, cfg.num_mtp_layers)
            emb = self.embed(ids)  # [P, B, T, D]
            mtp_cache = None if cache is None else cache.stacks.get(MTP_STACK)
            stack = mtp_stack(cfg, mode, self.dtype, self.param_dtype, name=MTP_STACK)
            _, (mtp_h, new_mtp) = stack(h, (emb, mtp_cache), position_ids, segments, index, kv_valid)
            if mtp_cache is not None:
                new_stacks[MTP_STACK] = new_mtp
        new_cache = None if cache is None else KVCache(new_stacks, jnp.asarray(start + T, jnp.int32))
        return h, new_cache, mtp_h

    def project(self, h: jax.Array, deterministic: bool = True) -> jax.Array:
        """Float32 logits [..., V] of final hidden states [..., D] (the lm_head, or the tied embedding)."""
        if self.config.tie_word_embeddings:
            return self.embed.attend(h, deterministic)
        return self.lm_head(h, deterministic)

    def mtp_logits(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                   position_ids: jax.Array | None = None, segment_ids: jax.Array | None = None, *,
                   deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        """Training forward of a model with MTP layers: logits [B, T, V] and MTP logits [P, B, T, V].

        MTP layer d at t predicts token t + d + 1 (`ling_jax.model.mtp`).

        Raises:
          ValueError: the config has no MTP layers (`num_nextn_predict_layers` is 0).
        """
        if not self.config.num_mtp_layers:
            raise ValueError("the model has no MTP layers (num_nextn_predict_layers is 0)")
        h, _, mtp_h = self.forward_all(input_ids, attention_mask, position_ids, segment_ids,
                                       mtp_next_ids=roll_left(input_ids, 1, 0))
        return self.project(h, deterministic), self.project(mtp_h, deterministic)

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
        logits = self.project(h, deterministic)
        return logits if cache is None else (logits, new_cache)
