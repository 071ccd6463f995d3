"""Multi-token prediction (Ling 2.0): the `num_nextn_predict_layers` layers after the main stack.

Axis letters as in `ling_jax.model` (P: MTP depth). As the reference, MTP
layer d (1-based) at position t sees the normed final hidden state of the
layer before it (the main model's for d = 1) and the normed embedding of token
t + d, and predicts token t + d + 1 with the shared `lm_head`:

    x = eh_proj(concat(enorm(embed(ids[t + d])), hnorm(h[t])))     # [B, T, 2D] -> [B, T, D]
    x = DecoderLayer(x)                                            # attention + MoE block
    h = final_norm(x)                                              # input of layer d + 1

Ids past the end are 0 (the reference's `roll_tensor`). The layers are one
`nn.scan` stack (`MTP_STACK`); plain inference does not run them, training
adds `mtp_loss_scaling_factor` x their mean loss (`ling_jax.train.losses`), and
self-speculative decoding drafts with them (`ling_jax.inference.speculative`).

Parameters (per layer, stacked [P, ...]): `enorm`, `hnorm`, `eh_proj` [2D, D],
`layer/...` (a full MoE decoder layer), `final_norm`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import LingConfig
from ling_jax.model.attention import ModelMode
from ling_jax.model.decoder import DecoderLayer, remat_layer
from ling_jax.model.kv_cache import LayerCache
from ling_jax.model.layers import Dtype, RMSNorm, param_with_axes


def roll_left(x: jax.Array, shift: int, fill: int) -> jax.Array:
    """`x` [B, T] moved `shift` places to the left along T, the vacated end set to `fill` (`roll_tensor`)."""
    if shift == 0:
        return x
    pad = jnp.full(x.shape[:-1] + (shift,), fill, x.dtype)
    return jnp.concatenate([x[..., shift:], pad], axis=-1)[..., :x.shape[-1]]


def mtp_input_ids(next_ids: jax.Array, depth: int) -> jax.Array:
    """Ids [P, B, T] whose embeddings the P MTP layers take; `next_ids` [B, T] is token t + 1 at t."""
    return jnp.stack([roll_left(next_ids, d, 0) for d in range(depth)])


class MTPLayer(nn.Module):
    """One multi-token-prediction layer (module docstring); scanned, carrying the hidden state."""

    config: LingConfig
    mode: ModelMode = ModelMode.FORWARD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, xs: tuple[jax.Array, LayerCache | None], position_ids: jax.Array,
                 segments: jax.Array, cache_index: jax.Array | None, kv_valid: jax.Array | None
                 ) -> tuple[jax.Array, tuple[jax.Array, LayerCache | None]]:
        """[B, T, D] hidden state and this depth's (embeddings [B, T, D], cache) -> (next carry, (hidden, cache))."""
        cfg, dt, pd = self.config, self.dtype, self.param_dtype
        emb, cache = xs
        D = cfg.hidden_size
        e = RMSNorm(cfg.rms_norm_eps, dt, pd, name="enorm")(emb)
        hh = RMSNorm(cfg.rms_norm_eps, dt, pd, name="hnorm")(h)
        w = param_with_axes(self, "eh_proj", (2 * D, D), ("mlp", "embed"), pd)
        x = jnp.concatenate([e, hh], axis=-1) @ w.astype(dt)  # [B, T, 2D] x [2D, D] -> [B, T, D]
        x, new_cache = DecoderLayer(cfg, True, self.mode, dt, pd, name="layer")(
            x, cache, position_ids, segments, cache_index, kv_valid)
        out = RMSNorm(cfg.rms_norm_eps, dt, pd, name="final_norm")(x)
        return out, (out, new_cache)


def mtp_stack(config: LingConfig, mode: ModelMode, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
    """The scanned stack of the config's MTP layers."""
    scanned = nn.scan(
        remat_layer(MTPLayer, config),
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=config.num_mtp_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(config, mode, dtype, param_dtype, name=name)
