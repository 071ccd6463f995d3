"""Grouped matmul ``gmm`` for TPU in Pallas Mosaic: ``out[rows of g] = lhs[rows of g] @ rhs[g]``.

Design (megablox-style, written from scratch for this repository):

* The grid is ``(n tiles, visits, k tiles)``. A *visit* is one ``tm``-row tile
  of ``lhs``/``out`` paired with one group; the visit list is computed in XLA
  (`pallas_kernels.common.aligned_gmm_schedule`) and handed to the kernel as
  scalar-prefetched SMEM arrays through `pltpu.PrefetchScalarGridSpec`, so the
  block index maps can read them. The visit axis is a *dynamic* grid
  dimension: only the visits that exist are launched (``<= m / tm + L``).
* A row tile that straddles a group boundary is visited once per group,
  consecutively; the output block stays resident in VMEM between those visits
  and each visit overwrites only its own rows (a select on the store).
* Accumulation is float32 in a VMEM scratch ``[tm, tn]`` across the k tiles;
  the product runs in bfloat16 when both inputs are bfloat16.
* Rows owned by no local group (other shards' experts, rows past
  ``sum(group_sizes)``, row tiles no local group touches) are written as
  zeros: the first visit of every row tile starts from zeros instead of the
  (stale) VMEM block, and tiles outside the local rows get zero-only visits.
* ``k`` need not be a multiple of ``tk``: the last k block is masked. ``m``
  and ``n`` need not be multiples of their tiles: out-of-bounds rows/columns
  of edge blocks are never stored.
* ``transpose_rhs`` contracts with the last axis of ``rhs`` (``[L, n, k]``),
  which is how the backward pass computes ``dy @ rhs[g]^T`` without
  materialising a transposed weight copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common

__all__ = ["default_tiling", "gmm"]


def _lane_tile(dim: int, prefs: tuple[int, ...] = (512, 256, 128), full_max: int = 2048) -> int:
    """A tile for a lane-mapped dimension: a preferred multiple of 128 that divides ``dim``,
    else the whole dimension when it is small enough, else the last preference (masked tail)."""
    for t in prefs:
        if dim % t == 0:
            return t
    return dim if dim <= full_max else prefs[-1]


def default_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Default ``(tm, tk, tn)``: 128-row tiles (the whole ``m`` when smaller), lane tiles for k, n."""
    tm = m if m <= 128 else 128
    return tm, _lane_tile(k), _lane_tile(n)


def _kernel(tile_ref: jax.Array, group_ref: jax.Array, lo_ref: jax.Array, hi_ref: jax.Array,
            first_ref: jax.Array, lhs_ref: jax.Array, rhs_ref: jax.Array, out_ref: jax.Array,
            acc_ref: jax.Array, *, tm: int, tk: int, k: int, tiles_k: int, transpose_rhs: bool,
            cd: jnp.dtype) -> None:
    """One (n tile, visit, k tile) step: accumulate ``lhs_tile @ rhs_tile``, store on the last k tile."""
    del group_ref  # Only used by the index maps.
    v = pl.program_id(1)
    kk = pl.program_id(2)
    lo = lo_ref[v]
    hi = hi_ref[v]

    @pl.when(kk == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(hi > lo)
    def _accumulate():
        x = lhs_ref[...]
        w = rhs_ref[...]
        if k % tk:
            # The last k block reads past k: zero both operands there.
            kx = kk * tk + lax.broadcasted_iota(jnp.int32, x.shape, 1)
            kw = kk * tk + lax.broadcasted_iota(jnp.int32, w.shape, 1 if transpose_rhs else 0)
            x = jnp.where(kx < k, x.astype(jnp.float32), 0)
            w = jnp.where(kw < k, w.astype(jnp.float32), 0)
        dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        acc_ref[...] += lax.dot_general(x.astype(cd), w.astype(cd), dims,
                                        preferred_element_type=jnp.float32)

    @pl.when(kk == tiles_k - 1)
    def _store():
        rows = tile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= lo) & (rows < hi)
        base = jnp.where(first_ref[v] == 1, 0.0, out_ref[...].astype(jnp.float32))
        out_ref[...] = jnp.where(mine, acc_ref[...], base).astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tiling", "interpret"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
        group_offset: jax.Array | int | None = None, *, transpose_rhs: bool = False,
        out_dtype: jnp.dtype | None = None, tiling: tuple[int, int, int] | None = None,
        interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Grouped matmul on TPU (not differentiable by itself; see `pallas_kernels.gmm`).

    Args:
      lhs: ``[m, k]`` float32/bfloat16, rows sorted by group.
      rhs: ``[L, k, n]`` (``[L, n, k]`` with ``transpose_rhs``): the local groups' weights.
      group_sizes: ``[G]`` int, global rows per group (``G >= L``).
      group_offset: scalar, the global id of ``rhs[0]`` (default 0).
      transpose_rhs: contract ``lhs`` with the last axis of ``rhs``.
      out_dtype: result dtype (default ``lhs.dtype``); accumulation is float32.
      tiling: ``(tm, tk, tn)``; default `default_tiling`.
      interpret: run the Pallas interpreter (CPU testing); ``True`` or a
        ``pltpu.InterpretParams``.

    Returns:
      ``[m, n]``: rows of local groups hold their product, all other rows 0.
    """
    common.check_gmm_args(lhs, rhs, group_sizes, transpose_rhs)
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling or default_tiling(m, k, n)
    tiles_k, tiles_n = common.cdiv(k, tk), common.cdiv(n, tn)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    sched = common.aligned_gmm_schedule(group_sizes, common.as_offset(group_offset), num_local, m, tm)

    def lhs_map(j, v, kk, tile, group, lo, hi, first):
        return tile[v], kk

    def rhs_map(j, v, kk, tile, group, lo, hi, first):
        return (group[v], j, kk) if transpose_rhs else (group[v], kk, j)

    def out_map(j, v, kk, tile, group, lo, hi, first):
        return tile[v], j

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    kernel = functools.partial(_kernel, tm=tm, tk=tk, k=k, tiles_k=tiles_k,
                               transpose_rhs=transpose_rhs, cd=common.compute_dtype(lhs, rhs))
    bytes_accessed = (lhs.size * lhs.dtype.itemsize * tiles_n
                      + (m // tm + num_local) * k * n * rhs.dtype.itemsize
                      + m * n * out_dtype.itemsize)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(tiles_n, sched.num_visits, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec(rhs_block, rhs_map)],
            out_specs=pl.BlockSpec((tm, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                                      bytes_accessed=int(bytes_accessed)),
        interpret=interpret,
        name="ling_gmm_tpu",
    )
    return call(sched.tile, sched.group, sched.lo, sched.hi, sched.first, lhs, rhs)

