"""Transposed grouped matmul ``tgmm`` for GPU in Pallas on Triton: ``out[g] = lhs[rows of g]^T @ dy[rows of g]``.

The weight gradient of `pallas_kernels.gmm_gpu.gmm`. Triton was chosen over
Mosaic GPU for the reasons given in `pallas_kernels.gmm_gpu` (Ampere and
Hopper, ROCm, CPU interpret mode). Design:

* One program per ``(local group, k tile, n tile)`` output block; it walks the
  group's rows ``[lo, hi)`` in ``tm``-row steps with a dynamic-trip-count
  loop (``scf.while``), so the work per group is proportional to its rows and
  an empty group just stores zeros. The grid is static, ``L * cdiv(k, tk) *
  cdiv(n, tn)`` programs, which keeps the GPU busy even when a few experts
  receive most rows.
* Row tiles start at the group's first row; rows at or past ``hi`` (the next
  group, the end of ``lhs``) and columns past ``k``/``n`` are masked loads that
  read 0, so no garbage can reach the sum.
* The ``[tk, tn]`` float32 accumulator is a loop carry; each step is
  ``x^T @ dy`` with ``x`` transposed by ``tt.trans`` feeding ``tt.dot``
  (bfloat16 tensor cores when both inputs are bfloat16, IEEE float32 otherwise).
* ``group_offset``/``num_groups`` select the local groups: program ``l`` computes
  global group ``group_offset + l``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common
from pallas_kernels.gmm_gpu import compiler_params, pow2_tile

__all__ = ["default_tiling", "tgmm"]


def default_tiling(m: int, k: int, n: int, num_groups: int, dtype: jnp.dtype) -> tuple[int, int, int]:
    """Default ``(tm, tk, tn)``: 32-row steps (64 for bf16) and 64x64 (bf16 128x128) output blocks."""
    del num_groups
    wide = jnp.dtype(dtype) == jnp.bfloat16
    return (pow2_tile(m, 64 if wide else 32), pow2_tile(k, 128 if wide else 64),
            pow2_tile(n, 128 if wide else 64))


def _kernel(lo_ref: jax.Array, hi_ref: jax.Array, lhs_ref: jax.Array, dy_ref: jax.Array,
            out_ref: jax.Array, *, k: int, n: int, tm: int, tk: int, tn: int, cd: jnp.dtype) -> None:
    """One (group, k tile, n tile) program: ``sum over row steps of x^T @ dy``."""
    g = pl.program_id(0)
    i = pl.program_id(1)
    j = pl.program_id(2)
    lo = lo_ref[g]
    hi = hi_ref[g]
    ks = i * tk + jnp.arange(tk, dtype=jnp.int32)
    ns = j * tn + jnp.arange(tn, dtype=jnp.int32)

    def body(t: jax.Array, acc: jax.Array) -> jax.Array:
        r0 = lo + t * tm
        row_ok = ((r0 + jnp.arange(tm, dtype=jnp.int32)) < hi)[:, None]
        x = plgpu.load(lhs_ref.at[pl.ds(r0, tm), pl.ds(i * tk, tk)],
                       mask=row_ok & (ks < k)[None, :], other=0.0)
        d = plgpu.load(dy_ref.at[pl.ds(r0, tm), pl.ds(j * tn, tn)],
                       mask=row_ok & (ns < n)[None, :], other=0.0)
        return acc + lax.dot_general(x.astype(cd), d.astype(cd), (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    steps = (hi - lo + tm - 1) // tm
    acc = lax.fori_loop(0, steps, body, jnp.zeros((tk, tn), jnp.float32))
    plgpu.store(out_ref.at[g, pl.ds(i * tk, tk), pl.ds(j * tn, tn)], acc.astype(out_ref.dtype),
                mask=(ks < k)[:, None] & (ns < n)[None, :])


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiling", "interpret"))
def tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array,
         group_offset: jax.Array | int | None = None, *, num_groups: int | None = None,
         out_dtype: jnp.dtype | None = None, tiling: tuple[int, int, int] | None = None,
         interpret: bool = False) -> jax.Array:
    """Per-group ``lhs^T @ dy`` on GPU.

    Args:
      lhs: ``[m, k]`` float32/bfloat16, rows sorted by group.
      dy: ``[m, n]`` float32/bfloat16, same row order.
      group_sizes: ``[G]`` int, global rows per group.
      group_offset: scalar, first global group to compute (default 0).
      num_groups: number of local groups ``L`` (default ``G``); requires
        ``group_offset + L <= G``.
      out_dtype: result dtype (default ``lhs.dtype``); accumulation is float32.
      tiling: ``(tm, tk, tn)``, powers of two; default `default_tiling`.
      interpret: run the Pallas interpreter (CPU testing).

    Returns:
      ``[L, k, n]``; empty groups give zeros.
    """
    num_local = num_groups or group_sizes.shape[0]
    common.check_tgmm_args(lhs, dy, group_sizes, num_local)
    m, k = lhs.shape
    n = dy.shape[1]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    cd = common.compute_dtype(lhs, dy)
    tiling = tiling or default_tiling(m, k, n, group_sizes.shape[0], cd)
    tm, tk, tn = tiling
    lo, hi = common.local_bounds(group_sizes, common.as_offset(group_offset), num_local)
    kernel = functools.partial(_kernel, k=k, n=n, tm=tm, tk=tk, tn=tn, cd=cd)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_local, k, n), out_dtype),
        grid=(num_local, common.cdiv(k, tk), common.cdiv(n, tn)),
        compiler_params=compiler_params((tk, tm, tn)),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n, transcendentals=0,
            bytes_accessed=int(lhs.size * lhs.dtype.itemsize * common.cdiv(n, tn)
                               + dy.size * dy.dtype.itemsize * common.cdiv(k, tk)
                               + num_local * k * n * out_dtype.itemsize)),
        interpret=interpret,
        name="ling_tgmm_gpu",
    )
    return call(lo, hi, lhs, dy)

