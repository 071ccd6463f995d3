"""Transposed grouped matmul ``tgmm`` for TPU in Pallas Mosaic: ``out[g] = lhs[rows of g]^T @ dy[rows of g]``.

This is the weight gradient of `pallas_kernels.gmm_tpu.gmm`. Design:

* The grid is ``(k tiles, n tiles, visits)``; a visit is one ``tm``-row tile
  of ``lhs``/``dy`` for one local group, ordered group by group
  (`pallas_kernels.common.aligned_tgmm_schedule`), passed as scalar-prefetched
  SMEM arrays through `pltpu.PrefetchScalarGridSpec`. The visit axis is a
  dynamic grid dimension bounded by ``m / tm + L``.
* The ``[tk, tn]`` float32 accumulator lives in VMEM scratch; it is zeroed on
  a group's first visit and stored into ``out[g]`` on its last. Consecutive
  visits of one group keep the same output block, so it is written back once.
* Rows of a tile outside the group (neighbouring groups, rows past
  ``sum(group_sizes)``, the out-of-bounds tail of the last tile) are masked
  with a select on both operands, so garbage there (even NaN) cannot leak.
* An empty local group still gets one visit, which writes zeros.
* The product contracts over rows: the masked ``lhs`` tile is transposed in
  float32 (supported for any layout by Mosaic) and multiplied in bfloat16 when
  both inputs are bfloat16, accumulating in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.gmm_tpu import default_tiling

__all__ = ["default_tiling", "tgmm"]


def _kernel(tile_ref: jax.Array, group_ref: jax.Array, lo_ref: jax.Array, hi_ref: jax.Array,
            first_ref: jax.Array, last_ref: jax.Array, lhs_ref: jax.Array, dy_ref: jax.Array,
            out_ref: jax.Array, acc_ref: jax.Array, *, tm: int, cd: jnp.dtype) -> None:
    """One (k tile, n tile, visit) step: ``acc += masked(lhs_tile)^T @ masked(dy_tile)``."""
    del group_ref  # Only used by the index maps.
    v = pl.program_id(2)
    lo = lo_ref[v]
    hi = hi_ref[v]

    @pl.when(first_ref[v] == 1)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(hi > lo)
    def _accumulate():
        row0 = tile_ref[v] * tm
        x = lhs_ref[...].astype(jnp.float32)
        d = dy_ref[...].astype(jnp.float32)
        x_rows = row0 + lax.broadcasted_iota(jnp.int32, x.shape, 0)
        d_rows = row0 + lax.broadcasted_iota(jnp.int32, d.shape, 0)
        x = jnp.where((x_rows >= lo) & (x_rows < hi), x, 0.0)
        d = jnp.where((d_rows >= lo) & (d_rows < hi), d, 0.0)
        acc_ref[...] += jnp.dot(x.T.astype(cd), d.astype(cd), preferred_element_type=jnp.float32)

    @pl.when(last_ref[v] == 1)
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiling", "interpret"))
def tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array,
         group_offset: jax.Array | int | None = None, *, num_groups: int | None = None,
         out_dtype: jnp.dtype | None = None, tiling: tuple[int, int, int] | None = None,
         interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Per-group ``lhs^T @ dy`` on TPU.

    Args:
      lhs: ``[m, k]`` float32/bfloat16, rows sorted by group.
      dy: ``[m, n]`` float32/bfloat16, same row order.
      group_sizes: ``[G]`` int, global rows per group.
      group_offset: scalar, first global group to compute (default 0).
      num_groups: number of local groups ``L`` (default ``G``); requires
        ``group_offset + L <= G``.
      out_dtype: result dtype (default ``lhs.dtype``); accumulation is float32.
      tiling: ``(tm, tk, tn)``; default `pallas_kernels.gmm_tpu.default_tiling`.
      interpret: run the Pallas interpreter (CPU testing); ``True`` or a
        ``pltpu.InterpretParams``.

    Returns:
      ``[L, k, n]``; empty groups give zeros.
    """
    num_local = num_groups or group_sizes.shape[0]
    common.check_tgmm_args(lhs, dy, group_sizes, num_local)
    m, k = lhs.shape
    n = dy.shape[1]
    tm, tk, tn = tiling or default_tiling(m, k, n)
    tiles_k, tiles_n = common.cdiv(k, tk), common.cdiv(n, tn)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    sched = common.aligned_tgmm_schedule(group_sizes, common.as_offset(group_offset),
                                         num_local, m, tm)

    def lhs_map(i, j, v, tile, group, lo, hi, first, last):
        return tile[v], i

    def dy_map(i, j, v, tile, group, lo, hi, first, last):
        return tile[v], j

    def out_map(i, j, v, tile, group, lo, hi, first, last):
        return group[v], i, j

    kernel = functools.partial(_kernel, tm=tm, cd=common.compute_dtype(lhs, dy))
    bytes_accessed = (lhs.size * lhs.dtype.itemsize * tiles_n + dy.size * dy.dtype.itemsize * tiles_k
                      + num_local * k * n * out_dtype.itemsize)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(tiles_k, tiles_n, sched.num_visits),
            in_specs=[pl.BlockSpec((tm, tk), lhs_map), pl.BlockSpec((tm, tn), dy_map)],
            out_specs=pl.BlockSpec((None, tk, tn), out_map),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                                      bytes_accessed=int(bytes_accessed)),
        interpret=interpret,
        name="ling_tgmm_tpu",
    )
    return call(sched.tile, sched.group, sched.lo, sched.hi, sched.first, sched.last, lhs, dy)

