"""The routed-expert FFN of the MoE layer: route -> permute -> SwiGLU over grouped matmuls -> unpermute -> combine.

Axis letters as in `ling_jax.model`. Written once: the single-device layer
(`ling_jax.model.moe.MoE`) calls `routed_ffn` directly, expert parallelism
(`ling_jax.model.expert_parallel`) calls it inside `shard_map` with a
`Dispatch` that moves the sorted rows to the devices owning their experts
and back.

The router (softmax or sigmoid, groups, bias) is `ling_jax.model.routing`.

At decode the rows are few (batch x k), and what costs is reading expert
weights, not arithmetic. `sparse_routed_ffn` is the decode path on the XLA
(CPU) grouped matmul: a loop over only the experts some row chose, each
reading its three weights once and multiplying its rows (at most a few, in
one window of rows), with no per-group padding, no switch over row
buckets and no visit to unchosen experts. On TPU and GPU the decode path stays
on the Pallas grouped matmul, whose schedule launches only the row-tile /
group visits that exist with a row tile of the whole (small) M, so it reads
each chosen expert once as well (see `ling_jax.model.moe`).

The expert outputs are weighted and summed over the k slots in float32 (the
caller casts back).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ling_jax.config import GmmImpl
from ling_jax.model.grouped_matmul import grouped_matmul
from ling_jax.model.quantization import QArray

# A dispatch's result: the rows its grouped matmuls run on [R, D], their group sizes, and the return trip.
Dispatched = tuple[jax.Array, jax.Array, Callable[[jax.Array], jax.Array]]
# (sorted rows [M, D], rows per expert [E]) -> Dispatched.
Dispatch = Callable[[jax.Array, jax.Array], Dispatched]


def permute(x: jax.Array, experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sorts the (token, slot) rows by expert.

    Args:
      x: [X, D] tokens.
      experts: [X, k] chosen experts.
      num_experts: E.

    Returns:
      rows [M, D] sorted by expert, group sizes [E] int32, and `order` [M]
      (the flat (token, slot) index of each sorted row) for `unpermute`.
    """
    k = experts.shape[1]
    flat = experts.reshape(-1)  # [M]
    order = jnp.argsort(flat, stable=True)
    rows = jnp.take(x, order // k, axis=0)  # [M, D]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return rows, group_sizes, order


def unpermute(rows: jax.Array, order: jax.Array, k: int) -> jax.Array:
    """Inverse of `permute`: [M, D] sorted rows -> [X, k, D]."""
    inverse = jnp.argsort(order)
    return jnp.take(rows, inverse, axis=0).reshape(-1, k, rows.shape[-1])


def swiglu_experts(rows: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, group_sizes: jax.Array,
                   impl: GmmImpl) -> jax.Array:
    """`down(silu(gate(rows)) * up(rows))` per expert: [M, D] rows sorted by expert -> [M, D].

    Args:
      rows: [M, D], group g's rows multiplied by expert g's weights.
      wg, wu: [E, D, F] gate and up projections; wd: [E, F, D] down projection.
      group_sizes: [E] rows per expert; rows past their sum give zeros.
      impl: the grouped matmul (`ling_jax.model.grouped_matmul`).
    """
    gmm = lambda lhs, w: grouped_matmul(lhs, w, group_sizes, impl=impl)  # noqa: E731
    h = jax.nn.silu(gmm(rows, wg)) * gmm(rows, wu)  # [M, F]
    return gmm(h, wd)  # [M, D]


def combine(out: jax.Array, weights: jax.Array) -> jax.Array:
    """Float32 weighted sum over the k slots: [X, k, D] expert outputs, [X, k] weights -> [X, D] float32."""
    return jnp.sum(out.astype(jnp.float32) * weights[..., None], axis=1)


def local_dispatch(rows: jax.Array, counts: jax.Array) -> Dispatched:
    """No exchange: every expert is on this device."""
    return rows, counts, lambda out: out


def _expert(w: jax.Array | QArray, g: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Expert g's weight of an [E, ...] stack (an int8 stack dequantizes only that expert)."""
    if isinstance(w, QArray):
        return w.index(g).astype(dtype)
    return jax.lax.dynamic_index_in_dim(w, g, keepdims=False)


def sparse_routed_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array, wg: jax.Array, wu: jax.Array,
                      wd: jax.Array) -> jax.Array:
    """`routed_ffn` for a few rows (decode), visiting only the chosen experts (module docstring).

    The visits are unrolled (U = min(X * k, E) of them, static): a loop or a
    conditional would need the layer's whole expert stack as an operand, which
    XLA then copies out of the scanned layer stack on every step. The chosen
    experts are visited largest group first; visit u reads that expert's
    weights and multiplies a window of min(X, M // (u + 1)) rows holding its
    rows (M = X * k rows in all; a token picks an expert at most once, so a
    group has at most X rows, and the u-th largest of sizes summing to M at
    most M / (u + 1)). At batch 8, top-4 of 16, that is 69 rows multiplied
    instead of 16 x 8. Visits past the number of chosen experts own no row.
    Forward only. Same numbers as `routed_ffn`: float32 accumulation of each
    product, results stored in the rows' dtype, float32 combine.

    Args:
      x: [X, D] tokens.
      weights: [X, k] float32 router weights; experts: [X, k] int32 chosen experts.
      wg, wu: [E, D, F] and wd: [E, F, D], all the experts (float in the rows' dtype, or int8 `QArray`s).

    Returns:
      [X, D] float32.
    """
    E = wg.shape[0]
    X = x.shape[0]
    rows, sizes, order = permute(x, experts, E)  # [M, D], [E]
    M = rows.shape[0]
    starts = jnp.cumsum(sizes) - sizes  # [E]
    by_size = jnp.argsort(-sizes, stable=True)[:min(M, E)]  # [U] experts, the largest group first

    def mm(a: jax.Array, w: jax.Array) -> jax.Array:
        return jax.lax.dot(a, w, preferred_element_type=jnp.float32).astype(rows.dtype)

    out = jnp.zeros_like(rows)  # [M, D]
    for u in range(by_size.shape[0]):
        # The u-th largest of E sizes summing to M is at most M / (u + 1); a group is at most X rows.
        window = min(X, M // (u + 1))
        g = by_size[u]
        lo, hi = starts[g], starts[g] + sizes[g]
        r0 = jnp.clip(lo, 0, M - window)  # an in-bounds window holding the group
        a = jax.lax.dynamic_slice_in_dim(rows, r0, window)  # [W, D]
        g_w, u_w, d_w = (_expert(w, g, rows.dtype) for w in (wg, wu, wd))
        y = mm(jax.nn.silu(mm(a, g_w)) * mm(a, u_w), d_w)  # [W, D]
        r = r0 + jnp.arange(window)
        mine = ((r >= lo) & (r < hi))[:, None]  # an empty group (fewer than U chosen) owns no row
        old = jax.lax.dynamic_slice_in_dim(out, r0, window)
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), r0, 0)
    return combine(unpermute(out, order, experts.shape[1]), weights)


def routed_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array, wg: jax.Array, wu: jax.Array,
               wd: jax.Array, *, num_experts: int, impl: GmmImpl, dispatch: Dispatch = local_dispatch) -> jax.Array:
    """Sum over k of weight * expert(x) for routed tokens.

    Args:
      x: [X, D] tokens.
      weights: [X, k] float32 router weights; experts: [X, k] int32 chosen experts.
      wg, wu: [E', D, F] and wd: [E', F, D], the experts the grouped matmuls see
        (all E of them, or a device's share under expert parallelism).
      num_experts: E, the number of experts `experts` indexes.
      impl: the grouped matmul.
      dispatch: moves the rows sorted by expert to where their experts are and
        back (default: they are here).

    Returns:
      [X, D] float32.
    """
    rows, counts, order = permute(x, experts, num_experts)  # [M, D], [E]
    recv, group_sizes, back = dispatch(rows, counts)
    out = back(swiglu_experts(recv, wg, wu, wd, group_sizes, impl))  # [M, D]
    return combine(unpermute(out, order, experts.shape[1]), weights)
