"""The one pure-jnp reference of ``gmm`` and ``tgmm`` (vocabulary as in `pallas_kernels.common`).

Written straight from the definitions, row by row, so that it is obviously
right rather than fast: ``gmm`` gathers every row's group weight (an
``[m, k, n]`` array), ``tgmm`` contracts a one-hot ``[m, L]`` group mask. Both
accumulate in float32 at the highest matmul precision, in the kernels'
compute dtype (`pallas_kernels.common.compute_dtype`). Memory grows as
``m * k * n``: for tests and tiny shapes. Every kernel test checks against it
(through ``tests/pallas_testing.py``), and it is ``GmmImpl.REFERENCE`` of
`ling_jax.model.grouped_matmul` (differentiable by plain autodiff).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common

__all__ = ["gmm_reference", "row_groups", "tgmm_reference"]


def row_groups(group_sizes: jax.Array, group_offset: jax.Array, num_local: int,
               m: int) -> tuple[jax.Array, jax.Array]:
    """Local group of every row (clamped into ``[0, L)``) and whether the row lies in a local group.

    Args:
      group_sizes: ``[G]`` global rows per group.
      group_offset: scalar int32, the global id of local group 0.
      num_local: ``L``.
      m: the number of rows.

    Returns:
      ``[m]`` int32 local group ids and ``[m]`` bool.
    """
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    rows = jnp.arange(m)
    gid = jnp.searchsorted(ends, rows, side="right") - group_offset
    valid = (gid >= 0) & (gid < num_local) & (rows < ends[-1])
    return jnp.clip(gid, 0, num_local - 1).astype(jnp.int32), valid


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype"))
def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                  group_offset: jax.Array | int | None = None, *, transpose_rhs: bool = False,
                  out_dtype: jnp.dtype | None = None) -> jax.Array:
    """``out[r] = lhs[r] @ rhs[group(r) - group_offset]`` for rows of local groups, 0 elsewhere.

    Args:
      lhs: ``[m, k]`` rows sorted by group.
      rhs: ``[L, k, n]`` (``[L, n, k]`` with ``transpose_rhs``) local weights.
      group_sizes: ``[G]`` global rows per group.
      group_offset: first global group held in ``rhs`` (default 0).
      transpose_rhs: contract with the last axis of ``rhs``.
      out_dtype: result dtype (default ``lhs.dtype``).

    Returns:
      ``[m, n]``.
    """
    gid, valid = row_groups(group_sizes, common.as_offset(group_offset), rhs.shape[0], lhs.shape[0])
    cd = common.compute_dtype(lhs, rhs)
    spec = "mk,mnk->mn" if transpose_rhs else "mk,mkn->mn"
    out = jnp.einsum(spec, lhs.astype(cd), rhs[gid].astype(cd), preferred_element_type=jnp.float32,
                     precision=lax.Precision.HIGHEST)  # [m, n]
    return jnp.where(valid[:, None], out, 0).astype(out_dtype or lhs.dtype)  # a select: NaN-safe


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype"))
def tgmm_reference(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array,
                   group_offset: jax.Array | int | None = None, *, num_groups: int | None = None,
                   out_dtype: jnp.dtype | None = None) -> jax.Array:
    """``out[l] = lhs[rows of l]^T @ dy[rows of l]`` for the local groups.

    Args:
      lhs: ``[m, k]`` rows sorted by group.
      dy: ``[m, n]`` same row order.
      group_sizes: ``[G]`` global rows per group.
      group_offset: first global group to compute (default 0).
      num_groups: number of local groups ``L`` (default ``G``).
      out_dtype: result dtype (default ``lhs.dtype``).

    Returns:
      ``[L, k, n]``; empty groups give zeros.
    """
    num_local = num_groups or group_sizes.shape[0]
    gid, valid = row_groups(group_sizes, common.as_offset(group_offset), num_local, lhs.shape[0])
    cd = common.compute_dtype(lhs, dy)
    onehot = (gid[:, None] == jnp.arange(num_local)[None, :]) & valid[:, None]  # [m, L]
    x = jnp.where(valid[:, None], lhs, 0).astype(cd)  # rows of no local group: 0, even if NaN
    d = jnp.where(valid[:, None], dy, 0).astype(cd)
    out = jnp.einsum("ml,mk,mn->lkn", onehot.astype(cd), x, d, preferred_element_type=jnp.float32,
                     precision=lax.Precision.HIGHEST)
    return out.astype(out_dtype or lhs.dtype)
