"""Public, differentiable grouped matmuls: `gmm` and `tgmm` with a backend switch.

``gmm`` is a `jax.custom_vjp`: its backward pass is another ``gmm`` for the
input gradient (``dy @ rhs[g]^T``, via ``transpose_rhs`` so no transposed weight
copy is made) and a ``tgmm`` for the weight gradient (``lhs_g^T @ dy_g``),
both on the same backend, so ``jax.grad`` works through it with respect to
``lhs`` and ``rhs``. ``group_sizes`` and ``group_offset`` are integer inputs
with no gradient.

Backends (`pallas_kernels.common.Backend`, strings accepted): ``"tpu"``
(Pallas Mosaic, `pallas_kernels.gmm_tpu` / `pallas_kernels.tgmm_tpu`) and
``"gpu"`` (Pallas on Triton, `pallas_kernels.gmm_gpu` / `pallas_kernels.tgmm_gpu`);
``None`` picks the one for the target platform (`common.target_platform`: the mesh's devices). Both run on CPU with
``interpret=True``.

``group_offset`` semantics (as megablox): ``group_sizes`` is the global ``[G]``
row count per group, ``rhs`` holds ``L = rhs.shape[0]`` consecutive groups
starting at global group ``group_offset``; rows of other groups come out as
zeros and get zero input gradient. A device that only holds its own rows can
equally pass local ``group_sizes`` ``[L]`` and ``group_offset = 0``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import common, gmm_gpu, gmm_tpu, tgmm_gpu, tgmm_tpu
from pallas_kernels.common import Backend

__all__ = ["gmm", "tgmm"]

Tiling = tuple[int, int, int]


class _Config(NamedTuple):
    """Static (hashable) settings of one differentiable ``gmm``."""

    backend: Backend
    transpose_rhs: bool
    out_dtype: jnp.dtype | None
    tiling: Tiling | None
    interpret: object


def _check_interpret(backend: Backend, interpret: object) -> None:
    if not interpret and common.target_platform() == "cpu":
        raise ValueError(f"Pallas {backend.value} kernels run on CPU only with interpret=True")


def _gmm_raw(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
             *, backend: Backend, transpose_rhs: bool, out_dtype: jnp.dtype | None,
             tiling: Tiling | None, interpret: object) -> jax.Array:
    impl = gmm_tpu.gmm if backend is Backend.TPU else gmm_gpu.gmm
    return impl(lhs, rhs, group_sizes, group_offset, transpose_rhs=transpose_rhs,
                out_dtype=out_dtype, tiling=tiling, interpret=interpret)


def _tgmm_raw(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
              *, backend: Backend, num_groups: int | None, out_dtype: jnp.dtype | None,
              tiling: Tiling | None, interpret: object) -> jax.Array:
    impl = tgmm_tpu.tgmm if backend is Backend.TPU else tgmm_gpu.tgmm
    return impl(lhs, dy, group_sizes, group_offset, num_groups=num_groups,
                out_dtype=out_dtype, tiling=tiling, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_vjp(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
             cfg: _Config) -> jax.Array:
    return _gmm_raw(lhs, rhs, group_sizes, group_offset, backend=cfg.backend,
                    transpose_rhs=cfg.transpose_rhs, out_dtype=cfg.out_dtype, tiling=cfg.tiling,
                    interpret=cfg.interpret)


def _gmm_fwd(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
             cfg: _Config) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out = _gmm_vjp(lhs, rhs, group_sizes, group_offset, cfg)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(cfg: _Config, res: tuple[jax.Array, ...], dy: jax.Array) -> tuple[jax.Array | None, ...]:
    lhs, rhs, group_sizes, group_offset = res
    tm, tk, tn = cfg.tiling or (None, None, None)
    # dlhs[m, k] = dy[m, n] @ rhs[g]^T: the contraction is now over n.
    dlhs = _gmm_raw(dy, rhs, group_sizes, group_offset, backend=cfg.backend,
                    transpose_rhs=not cfg.transpose_rhs, out_dtype=lhs.dtype,
                    tiling=cfg.tiling and (tm, tn, tk), interpret=cfg.interpret)
    if cfg.transpose_rhs:  # rhs is [L, n, k]: drhs[l] = dy_l^T @ lhs_l.
        drhs = _tgmm_raw(dy, lhs, group_sizes, group_offset, backend=cfg.backend,
                         num_groups=rhs.shape[0], out_dtype=rhs.dtype,
                         tiling=cfg.tiling and (tm, tn, tk), interpret=cfg.interpret)
    else:
        drhs = _tgmm_raw(lhs, dy, group_sizes, group_offset, backend=cfg.backend,
                         num_groups=rhs.shape[0], out_dtype=rhs.dtype, tiling=cfg.tiling,
                         interpret=cfg.interpret)
    return dlhs, drhs, None, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
        group_offset: jax.Array | int | None = None, *, transpose_rhs: bool = False,
        out_dtype: jnp.dtype | None = None, tiling: Tiling | None = None,
        backend: Backend | str | None = None, interpret: object = False) -> jax.Array:
    """Differentiable grouped matmul: row group ``g`` of ``lhs`` times ``rhs[g - group_offset]``.

    Args:
      lhs: ``[m, k]`` float32/bfloat16, rows sorted by group.
      rhs: ``[L, k, n]`` (``[L, n, k]`` with ``transpose_rhs``), the local groups' weights.
      group_sizes: ``[G]`` int, global rows per group (``G >= L``).
      group_offset: scalar global id of ``rhs[0]`` (default 0); may be traced.
      transpose_rhs: contract ``lhs`` with the last axis of ``rhs``.
      out_dtype: result dtype (default ``lhs.dtype``); accumulation is float32.
      tiling: forward ``(tm, tk, tn)``; the backward uses ``(tm, tn, tk)`` for
        the input gradient and ``(tm, tk, tn)`` for the weight gradient.
        Default: each kernel's ``default_tiling``.
      backend: ``"tpu"``, ``"gpu"``, a `Backend`, or ``None`` for the running platform.
      interpret: run the Pallas interpreter (required on CPU); for the TPU
        backend a ``pltpu.InterpretParams`` is also accepted.

    Returns:
      ``[m, n]``; rows outside the local groups are 0.
    """
    be = common.resolve_backend(backend)
    _check_interpret(be, interpret)
    common.check_gmm_args(lhs, rhs, group_sizes, transpose_rhs)
    cfg = _Config(be, bool(transpose_rhs), None if out_dtype is None else jnp.dtype(out_dtype),
                  None if tiling is None else tuple(tiling), interpret)
    return _gmm_vjp(lhs, rhs, group_sizes.astype(jnp.int32), common.as_offset(group_offset), cfg)


def tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array,
         group_offset: jax.Array | int | None = None, *, num_groups: int | None = None,
         out_dtype: jnp.dtype | None = None, tiling: Tiling | None = None,
         backend: Backend | str | None = None, interpret: object = False) -> jax.Array:
    """Per-group ``lhs_g^T @ dy_g`` (the weight gradient of `gmm`); not itself differentiable.

    Args:
      lhs: ``[m, k]`` float32/bfloat16, rows sorted by group.
      dy: ``[m, n]`` float32/bfloat16, same rows.
      group_sizes: ``[G]`` int, global rows per group.
      group_offset: scalar, first global group to compute (default 0).
      num_groups: local groups ``L`` (default ``G``); ``group_offset + L <= G``.
      out_dtype: result dtype (default ``lhs.dtype``); accumulation is float32.
      tiling: ``(tm, tk, tn)``; default each kernel's ``default_tiling``.
      backend: ``"tpu"``, ``"gpu"``, a `Backend`, or ``None`` for the running platform.
      interpret: run the Pallas interpreter (required on CPU).

    Returns:
      ``[L, k, n]``; empty groups give zeros.
    """
    be = common.resolve_backend(backend)
    _check_interpret(be, interpret)
    return _tgmm_raw(lhs, dy, group_sizes.astype(jnp.int32), common.as_offset(group_offset),
                     backend=be, num_groups=num_groups,
                     out_dtype=None if out_dtype is None else jnp.dtype(out_dtype),
                     tiling=None if tiling is None else tuple(tiling), interpret=interpret)
