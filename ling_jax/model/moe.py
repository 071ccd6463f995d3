"""The dropless mixture-of-experts layer as a Flax module: router, routed experts, shared experts.

Axis letters as in `ling_jax.model`. The routed experts are
`ling_jax.model.experts` (route -> permute -> SwiGLU over grouped matmuls ->
unpermute -> float32 combine, numerics as the reference); the shared experts
are one SwiGLU MLP of width `moe_intermediate_size * num_shared_experts`.

The grouped matmul is the one seam where the implementation is chosen
(`LingConfig.gmm_impl`, see `ling_jax.model.grouped_matmul`): only the rows
routed to an expert are multiplied by its weights.

Under a mesh with more than one device (set with `jax.set_mesh`, e.g. by
`ling_jax.model.sharding.use_mesh`), the routed experts run expert-parallel
(`ling_jax.model.expert_parallel.expert_parallel_ffn`, exchange chosen by
`MoE.exchange`); otherwise on one device. Routing and the router statistics
are computed on the global token arrays in both cases (under a mesh XLA
partitions them over the tokens), so the statistics are global.

At decode (`decode=True`, a few rows: at most `SPARSE_MAX_ROWS` token x
slot rows) on one device with the XLA grouped matmul, the routed experts run
`ling_jax.model.experts.sparse_routed_ffn`, which reads only the chosen
experts' weights (forward only; same numbers as `routed_ffn`). With the
Pallas grouped matmul (TPU, GPU) decode uses the kernel as it is: its row tile
is the whole M when M is small (TPU `tm = M` up to 128; GPU the next power of
two >= 16, at most 64), and only the visits of non-empty groups do work, so
each chosen expert's weights are read once and unchosen experts not at all.

Router statistics go to the `intermediates` collection (`sow`), one entry per
layer: `tokens_per_expert` [E], `router_prob_mean` [E] (mean router
score of each expert over real tokens: softmax probability or sigmoid score) and `router_z_loss` (mean squared
log-sum-exp of the logits). Training reads them for logging and balance losses.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import EXPERT_BIAS, Exchange, GmmImpl, LingConfig
from ling_jax.model.expert_parallel import expert_parallel_ffn
from ling_jax.model.experts import routed_ffn, sparse_routed_ffn
from ling_jax.model.grouped_matmul import resolve_impl
from ling_jax.model.layers import MLP, Dtype, param_with_axes
from ling_jax.model.quantization import QArray
from ling_jax.model.routing import route_for
from ling_jax.model.sharding import mesh_is_parallel

SPARSE_MAX_ROWS = 64  # decode steps with at most this many token x slot rows visit only the chosen experts


class MoE(nn.Module):
    """Routed experts plus shared experts."""

    config: LingConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    exchange: Exchange = Exchange.AUTO  # how rows move between devices under a mesh
    decode: bool = False  # a KV-cache decode step (forward only; see the module docstring)

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """Applies the layer.

        Args:
          x: [B, T, D] hidden states.
          token_mask: [B, T] True for real tokens (statistics only).

        Returns:
          [B, T, D].
        """
        cfg = self.config
        B, T, D = x.shape
        E, F = cfg.num_experts, cfg.moe_intermediate_size
        pd, dt = self.param_dtype, self.dtype
        router = param_with_axes(self, "router", (D, E), ("embed", "expert_router"), pd)
        wg = param_with_axes(self, "gate_proj", (E, D, F), ("expert", "expert_embed", "expert_mlp"), pd)
        wu = param_with_axes(self, "up_proj", (E, D, F), ("expert", "expert_embed", "expert_mlp"), pd)
        wd = param_with_axes(self, "down_proj", (E, F, D), ("expert", "expert_mlp", "expert_embed"), pd)

        x = x.astype(dt)
        flat = x.reshape(B * T, D)  # [X, D]
        if cfg.router_in_float32:  # Ling 2.0: router logits in float32 whatever the compute dtype
            logits = flat.astype(jnp.float32) @ router.astype(jnp.float32)  # [X, E]
        else:
            logits = flat @ router.astype(dt)  # [X, E]
        bias = None
        if cfg.moe_router_enable_expert_bias:
            bias = param_with_axes(self, EXPERT_BIAS, (E,), ("expert_router",), pd, nn.initializers.zeros)
        probs, weights, experts = route_for(cfg, logits, bias)  # [X, E], [X, k], [X, k]
        k = experts.shape[1]
        self._sow_stats(logits, probs, experts, token_mask)

        mesh = jax.sharding.get_abstract_mesh()
        sparse = (not mesh_is_parallel(mesh) and self.decode and B * T * k <= SPARSE_MAX_ROWS
                   and resolve_impl(cfg.gmm_impl) is GmmImpl.XLA)
        w = None if sparse else (wg.astype(dt), wu.astype(dt), wd.astype(dt))
        if mesh_is_parallel(mesh):
            y = expert_parallel_ffn(flat, weights, experts, *w, mesh=mesh, impl=cfg.gmm_impl, exchange=self.exchange)
        elif sparse:  # int8 experts stay int8 here: only the visited ones are dequantized
            raw = tuple(p if isinstance(p, QArray) else p.astype(dt) for p in (wg, wu, wd))
            y = sparse_routed_ffn(flat, weights, experts, *raw).astype(dt)  # [X, D]
        else:
            y = routed_ffn(flat, weights, experts, *w, num_experts=E, impl=cfg.gmm_impl).astype(dt)  # [X, D]
        y = y.reshape(B, T, D)
        if cfg.num_shared_experts:
            y = y + MLP(cfg.shared_intermediate_size, dt, pd, name="shared_experts")(x)
        return y

    def _sow_stats(self, logits: jax.Array, probs: jax.Array, experts: jax.Array,
                   token_mask: jax.Array | None) -> None:
        """Sows the router statistics of the module docstring, over the real tokens only."""
        E = self.config.num_experts
        real = jnp.ones(logits.shape[0], jnp.float32) if token_mask is None else (
            token_mask.reshape(-1).astype(jnp.float32))  # [X]
        denom = jnp.maximum(jnp.sum(real), 1.0)
        counts = jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32) * real[:, None, None], axis=(0, 1))  # [E]
        z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [X]
        self.sow("intermediates", "tokens_per_expert", counts)
        self.sow("intermediates", "router_prob_mean", jnp.sum(probs * real[:, None], axis=0) / denom)
        self.sow("intermediates", "router_z_loss", jnp.sum(z * z * real) / denom)
