"""Grouped matmul ``gmm`` for GPU in Pallas on Triton: ``out[rows of g] = lhs[rows of g] @ rhs[g]``.

Why Triton and not Mosaic GPU: the Triton lowering runs on every NVIDIA
generation our users train on (Ampere A100 as well as Hopper H100) and on ROCm,
while Mosaic GPU targets Hopper/Blackwell only (wgmma, TMA, warpgroup
semantics). Triton kernels are plain per-program code with masked pointer
loads, which fits a ragged row layout, and the same kernel body runs under
``pallas_call(..., interpret=True)`` on CPU, which is how the tests check it.
The price is no scalar prefetch, no VMEM/SMEM scratch and no dynamic grid in
this lowering (``jax._src.pallas.triton.lowering`` rejects them), so:

* The visit list (`pallas_kernels.common.row_gmm_schedule`) is an ordinary
  int32 input read with scalar loads, and the grid is its static upper bound
  ``(n tiles, cdiv(m, tm) + L + 2)``; unused visits exit at once.
* Row tiles start at each group's first row (pointer loads need no
  alignment), so unlike the TPU kernel no tile is computed twice at a group
  boundary and every output row is written by exactly one program: the
  product for rows of local groups, zeros for all other rows (other shards'
  groups, rows past ``sum(group_sizes)``). Loads past ``m`` or ``k`` are masked
  to 0; stores are masked to the visit's rows and to ``n``.
* The float32 accumulator ``[tm, tn]`` is a loop carry over the k tiles (kept
  in registers by Triton). Products run in bfloat16 on tensor cores when both
  inputs are bfloat16; float32 inputs use IEEE float32 (no TF32), matching
  the other implementations to 1e-5.
* ``transpose_rhs`` reads ``rhs`` as ``[L, n, k]`` tiles and contracts their
  last axis (``tt.trans`` + ``tt.dot``), for the backward ``dy @ W^T``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import common

__all__ = ["compiler_params", "default_tiling", "gmm", "pow2_tile"]


def pow2_tile(x: int, cap: int, floor: int = 16) -> int:
    """The smallest power of two >= ``min(x, cap)``, at least ``floor`` (Triton needs powers of two)."""
    t = floor
    while t < min(x, cap):
        t *= 2
    return t


def default_tiling(m: int, k: int, n: int, num_groups: int, dtype: jnp.dtype) -> tuple[int, int, int]:
    """Default ``(tm, tk, tn)``: 64-row tiles when the mean group is small, else 128 (bf16) / 64 (f32)."""
    wide = jnp.dtype(dtype) == jnp.bfloat16
    tm_cap = 128 if wide and m >= 128 * num_groups else 64
    return (pow2_tile(m, tm_cap), pow2_tile(k, 64 if wide else 32),
            pow2_tile(n, 128 if wide else 64))


def compiler_params(tiling: tuple[int, int, int]) -> plgpu.CompilerParams:
    """Warps and pipeline stages for a tile size (4 warps up to 64x64 outputs, 8 above)."""
    tm, _, tn = tiling
    return plgpu.CompilerParams(num_warps=8 if tm * tn > 64 * 64 else 4, num_stages=3)


def _kernel(row0_ref: jax.Array, lo_ref: jax.Array, hi_ref: jax.Array, group_ref: jax.Array,
            compute_ref: jax.Array, lhs_ref: jax.Array, rhs_ref: jax.Array, out_ref: jax.Array, *,
            m: int, k: int, n: int, tm: int, tk: int, tn: int, transpose_rhs: bool,
            cd: jnp.dtype) -> None:
    """One (n tile, visit) program: a ``[tm, tn]`` output tile of one group, or zeros."""
    j = pl.program_id(0)
    v = pl.program_id(1)
    row0 = row0_ref[v]
    lo = lo_ref[v]
    hi = hi_ref[v]
    rows = row0 + jnp.arange(tm, dtype=jnp.int32)
    cols = j * tn + jnp.arange(tn, dtype=jnp.int32)
    store_mask = ((rows >= lo) & (rows < hi))[:, None] & (cols < n)[None, :]
    out_tile = out_ref.at[pl.ds(row0, tm), pl.ds(j * tn, tn)]

    @pl.when((compute_ref[v] == 1) & (hi > lo))
    def _product():
        g = group_ref[v]
        row_ok = (rows < m)[:, None]

        def body(kk: jax.Array, acc: jax.Array) -> jax.Array:
            ks = kk * tk + jnp.arange(tk, dtype=jnp.int32)
            x = plgpu.load(lhs_ref.at[pl.ds(row0, tm), pl.ds(kk * tk, tk)],
                           mask=row_ok & (ks < k)[None, :], other=0.0)
            if transpose_rhs:
                w = plgpu.load(rhs_ref.at[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)],
                               mask=(cols < n)[:, None] & (ks < k)[None, :], other=0.0)
                dims = (((1,), (1,)), ((), ()))
            else:
                w = plgpu.load(rhs_ref.at[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)],
                               mask=(ks < k)[:, None] & (cols < n)[None, :], other=0.0)
                dims = (((1,), (0,)), ((), ()))
            return acc + lax.dot_general(x.astype(cd), w.astype(cd), dims,
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, common.cdiv(k, tk), body, jnp.zeros((tm, tn), jnp.float32))
        plgpu.store(out_tile, acc.astype(out_ref.dtype), mask=store_mask)

    @pl.when((compute_ref[v] == 0) & (hi > lo))
    def _zeros():
        plgpu.store(out_tile, jnp.zeros((tm, tn), out_ref.dtype), mask=store_mask)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tiling", "interpret"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
        group_offset: jax.Array | int | None = None, *, transpose_rhs: bool = False,
        out_dtype: jnp.dtype | None = None, tiling: tuple[int, int, int] | None = None,
        interpret: bool = False) -> jax.Array:
    """Grouped matmul on GPU (not differentiable by itself; see `pallas_kernels.gmm`).

    Args:
      lhs: ``[m, k]`` float32/bfloat16, rows sorted by group.
      rhs: ``[L, k, n]`` (``[L, n, k]`` with ``transpose_rhs``): the local groups' weights.
      group_sizes: ``[G]`` int, global rows per group (``G >= L``).
      group_offset: scalar, the global id of ``rhs[0]`` (default 0).
      transpose_rhs: contract ``lhs`` with the last axis of ``rhs``.
      out_dtype: result dtype (default ``lhs.dtype``); accumulation is float32.
      tiling: ``(tm, tk, tn)``, powers of two; default `default_tiling`.
      interpret: run the Pallas interpreter (CPU testing).

    Returns:
      ``[m, n]``: rows of local groups hold their product, all other rows 0.
    """
    common.check_gmm_args(lhs, rhs, group_sizes, transpose_rhs)
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    cd = common.compute_dtype(lhs, rhs)
    tiling = tiling or default_tiling(m, k, n, group_sizes.shape[0], cd)
    tm, tk, tn = tiling
    sched = common.row_gmm_schedule(group_sizes, common.as_offset(group_offset), num_local, m, tm)
    kernel = functools.partial(_kernel, m=m, k=k, n=n, tm=tm, tk=tk, tn=tn,
                               transpose_rhs=transpose_rhs, cd=cd)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(common.cdiv(n, tn), sched.row0.shape[0]),
        compiler_params=compiler_params(tiling),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * k * n, transcendentals=0,
            bytes_accessed=int(lhs.size * lhs.dtype.itemsize * common.cdiv(n, tn)
                               + num_local * k * n * rhs.dtype.itemsize
                               + m * n * out_dtype.itemsize)),
        interpret=interpret,
        name="ling_gmm_gpu",
    )
    return call(sched.row0, sched.lo, sched.hi, sched.group, sched.compute, lhs, rhs)

