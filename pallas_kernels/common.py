"""Shared pieces of the grouped-matmul kernels: backends, validation, bounds, schedules.

Vocabulary used by every kernel file:

* ``lhs`` ``[m, k]``: rows sorted by group; group ``g`` owns rows
  ``[starts[g], ends[g])`` with ``ends = cumsum(group_sizes)``. Rows past
  ``sum(group_sizes)`` belong to no group.
* ``group_sizes`` ``[G]`` int32: the *global* row count of every group.
* ``group_offset`` (scalar int32, default 0) and ``L`` local groups: the kernels
  only compute groups ``group_offset .. group_offset + L - 1``, like the
  ``group_offset`` of megablox. For ``gmm`` ``L = rhs.shape[0]`` (``rhs`` holds
  only the local weights, local group ``l`` is global group ``group_offset + l``);
  for ``tgmm`` ``L`` is ``num_groups`` and the result is ``[L, k, n]``.
  Requires ``group_offset + L <= G``. A device that received only its own
  rows and knows only their per-expert counts simply passes the local
  ``group_sizes`` ``[L]`` with ``group_offset = 0``.
* Rows that belong to no local group (other devices' experts, and rows past
  ``sum(group_sizes)``) come out of ``gmm`` as exact zeros, never garbage, and
  contribute nothing to ``tgmm``.

Schedules are the scalar metadata the kernels iterate over; they are computed
in plain XLA from ``group_sizes`` (cheap, ``O(m / tm + G)`` elements).

The pure-jnp reference of both products is `pallas_kernels.reference`.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class Backend(enum.Enum):
    """Which Pallas lowering a kernel targets."""

    TPU = "tpu"
    GPU = "gpu"


def target_platform() -> str:
    """The platform the code being traced is compiled for: ``"tpu"``, ``"gpu"`` or ``"cpu"``.

    The devices of the mesh set with ``jax.set_mesh`` (inside ``jit`` its abstract
    mesh still names their platform), else the default backend. So a CPU host that
    traces under a mesh of TPU topology devices (``jax.experimental.topologies``)
    gets the TPU program: every ``AUTO`` choice and the interpret-mode guard of the
    kernels read this, never ``jax.default_backend()`` directly.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    platform = jax.default_backend() if device is None else device.platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def resolve_backend(backend: Backend | str | None) -> Backend:
    """Maps ``None`` (the target platform, `target_platform`), a ``Backend`` or its string to a ``Backend``.

    On CPU, where Pallas only runs in interpret mode, ``None`` resolves to the
    TPU kernels (the Mosaic interpreter is the more faithful one).
    """
    if backend is None:
        return Backend.GPU if target_platform() == "gpu" else Backend.TPU
    if isinstance(backend, Backend):
        return backend
    name = str(backend).lower()
    if name in ("cuda", "rocm"):
        name = "gpu"
    return Backend(name)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints."""
    return -(-a // b)


def _check_dtypes(group_sizes: jax.Array, **arrays: jax.Array) -> None:
    for name, x in arrays.items():
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16, got {x.dtype}")
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be a 1-D integer array, got {group_sizes.dtype}{group_sizes.shape}")


def check_gmm_args(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool) -> None:
    """Raises ``ValueError`` for ``gmm`` shapes or dtypes the kernels do not support."""
    if lhs.ndim != 2 or rhs.ndim != 3:
        raise ValueError(f"gmm needs lhs [m, k] and rhs [L, k, n]; got {lhs.shape} and {rhs.shape}")
    if lhs.shape[1] != rhs.shape[2 if transpose_rhs else 1]:
        raise ValueError(f"contraction mismatch: lhs {lhs.shape} vs rhs {rhs.shape} "
                         f"(transpose_rhs={transpose_rhs})")
    _check_dtypes(group_sizes, lhs=lhs, rhs=rhs)
    if rhs.shape[0] > group_sizes.shape[0]:
        raise ValueError(f"rhs has {rhs.shape[0]} groups but group_sizes only {group_sizes.shape[0]}")


def check_tgmm_args(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array, num_local: int) -> None:
    """Raises ``ValueError`` for ``tgmm`` shapes or dtypes the kernels do not support."""
    if lhs.ndim != 2 or dy.ndim != 2 or lhs.shape[0] != dy.shape[0]:
        raise ValueError(f"tgmm needs lhs [m, k] and dy [m, n]; got {lhs.shape} and {dy.shape}")
    _check_dtypes(group_sizes, lhs=lhs, dy=dy)
    if not 0 < num_local <= group_sizes.shape[0]:
        raise ValueError(f"num_groups={num_local} must be in [1, {group_sizes.shape[0]}]")


def compute_dtype(a: jax.Array, b: jax.Array) -> jnp.dtype:
    """Operand dtype of the MXU/tensor-core product: bf16 only if both inputs are bf16."""
    if a.dtype == jnp.bfloat16 and b.dtype == jnp.bfloat16:
        return jnp.dtype(jnp.bfloat16)
    return jnp.dtype(jnp.float32)


def as_offset(group_offset: jax.Array | int | None) -> jax.Array:
    """``group_offset`` as a scalar int32 array (0 when ``None``)."""
    if group_offset is None:
        return jnp.zeros((), jnp.int32)
    return jnp.asarray(group_offset, jnp.int32).reshape(())


def local_bounds(group_sizes: jax.Array, group_offset: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
    """Global first row and end row of each of the ``num_local`` local groups (int32 ``[L]``)."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    lo = lax.dynamic_slice_in_dim(starts, group_offset, num_local)
    hi = lax.dynamic_slice_in_dim(ends, group_offset, num_local)
    return lo, hi


class AlignedSchedule(NamedTuple):
    """Visits of ``tm``-aligned row tiles (TPU kernels), ``size`` entries each.

    Visit ``i`` works on row tile ``tile[i]`` (rows ``tile*tm .. tile*tm+tm``)
    with local group ``group[i]`` whose rows are ``[lo[i], hi[i])``
    (``lo == hi`` means nothing to compute). ``first``/``last`` flag the first
    and last visit of a row tile (``gmm``) or of a group (``tgmm``).
    Only the first ``num_visits`` entries are real.
    """

    tile: jax.Array
    group: jax.Array
    lo: jax.Array
    hi: jax.Array
    first: jax.Array
    last: jax.Array
    num_visits: jax.Array


def aligned_gmm_schedule(group_sizes: jax.Array, group_offset: jax.Array, num_local: int,
                         m: int, tm: int) -> AlignedSchedule:
    """Visits for ``gmm`` over aligned row tiles, every output row tile visited at least once.

    Order: tiles before the local rows (zero fill), then for each local group
    its tiles (a tile shared by two groups is visited once per group,
    consecutively), then tiles after the local rows (zero fill). At most
    ``cdiv(m, tm) + L`` visits.
    """
    tiles_m = cdiv(m, tm)
    size = tiles_m + num_local
    lo, hi = local_bounds(group_sizes, group_offset, num_local)
    nonempty = hi > lo
    first_tile = lo // tm
    count = jnp.where(nonempty, (hi - 1) // tm - first_tile + 1, 0)
    local_lo, local_hi = lo[0], hi[-1]
    has_local = local_hi > local_lo
    lead = jnp.where(has_local, local_lo // tm, tiles_m)
    trail_start = jnp.where(has_local, (local_hi - 1) // tm + 1, tiles_m)
    active = jnp.sum(count)
    cum = jnp.cumsum(count)

    i = jnp.arange(size, dtype=jnp.int32)
    j = i - lead
    grp = jnp.clip(jnp.searchsorted(cum, j, side="right"), 0, num_local - 1).astype(jnp.int32)
    act_tile = first_tile[grp] + j - (cum - count)[grp]
    t = j - active
    in_lead = i < lead
    in_act = (j >= 0) & (j < active)
    in_trail = (t >= 0) & (trail_start + t < tiles_m)
    tile = jnp.where(in_lead, i, jnp.where(in_act, act_tile, jnp.where(in_trail, trail_start + t, tiles_m - 1)))
    tile = jnp.clip(tile, 0, tiles_m - 1).astype(jnp.int32)
    group = jnp.where(in_act, grp, jnp.where(in_lead, 0, num_local - 1)).astype(jnp.int32)
    prev = jnp.concatenate([jnp.full((1,), -1, jnp.int32), tile[:-1]])
    nxt = jnp.concatenate([tile[1:], jnp.full((1,), -1, jnp.int32)])
    num_visits = lead + active + (tiles_m - trail_start)
    return AlignedSchedule(
        tile=tile,
        group=group,
        lo=jnp.where(in_act, lo[grp], 0).astype(jnp.int32),
        hi=jnp.where(in_act, hi[grp], 0).astype(jnp.int32),
        first=(tile != prev).astype(jnp.int32),
        last=((tile != nxt) | (i == num_visits - 1)).astype(jnp.int32),
        num_visits=num_visits.astype(jnp.int32),
    )


def aligned_tgmm_schedule(group_sizes: jax.Array, group_offset: jax.Array, num_local: int,
                          m: int, tm: int) -> AlignedSchedule:
    """Visits for ``tgmm``: each local group's aligned row tiles in order, one visit for an empty group.

    ``first``/``last`` flag a group's first and last visit (zero / store the
    accumulator). At most ``cdiv(m, tm) + L`` visits.
    """
    tiles_m = cdiv(m, tm)
    size = tiles_m + num_local
    lo, hi = local_bounds(group_sizes, group_offset, num_local)
    first_tile = lo // tm
    count = jnp.where(hi > lo, (hi - 1) // tm - first_tile + 1, 1)
    cum = jnp.cumsum(count)
    i = jnp.arange(size, dtype=jnp.int32)
    grp = jnp.clip(jnp.searchsorted(cum, i, side="right"), 0, num_local - 1).astype(jnp.int32)
    j = i - (cum - count)[grp]
    return AlignedSchedule(
        tile=jnp.clip(first_tile[grp] + j, 0, tiles_m - 1).astype(jnp.int32),
        group=grp,
        lo=lo[grp],
        hi=hi[grp],
        first=(j == 0).astype(jnp.int32),
        last=(j == count[grp] - 1).astype(jnp.int32),
        num_visits=cum[-1].astype(jnp.int32),
    )


class RowSchedule(NamedTuple):
    """Visits of group-relative row tiles (GPU ``gmm``), ``size`` entries each.

    Visit ``i`` writes rows ``[row0[i], row0[i] + tm) ∩ [lo[i], hi[i])``: the
    product with local group ``group[i]`` when ``compute[i]`` is 1, zeros
    otherwise. Every output row is written by exactly one visit; unused
    visits have ``lo == hi``.
    """

    row0: jax.Array
    lo: jax.Array
    hi: jax.Array
    group: jax.Array
    compute: jax.Array


def row_gmm_schedule(group_sizes: jax.Array, group_offset: jax.Array, num_local: int,
                     m: int, tm: int) -> RowSchedule:
    """Visits for the GPU ``gmm``: tiles start at each group's first row, so no tile is computed twice.

    Active visits come first (``sum(cdiv(size_l, tm))``), then zero-fill visits
    for the rows before and after the local groups. At most
    ``cdiv(m, tm) + L + 2`` visits.
    """
    size = cdiv(m, tm) + num_local + 2
    lo, hi = local_bounds(group_sizes, group_offset, num_local)
    count = (hi - lo + tm - 1) // tm
    cum = jnp.cumsum(count)
    active = cum[-1]
    local_lo, local_hi = lo[0], hi[-1]
    z_lead = (local_lo + tm - 1) // tm
    z_trail = (m - local_hi + tm - 1) // tm

    i = jnp.arange(size, dtype=jnp.int32)
    grp = jnp.clip(jnp.searchsorted(cum, i, side="right"), 0, num_local - 1).astype(jnp.int32)
    in_act = i < active
    a = i - active
    in_lead = (a >= 0) & (a < z_lead)
    b = a - z_lead
    in_trail = (b >= 0) & (b < z_trail)
    row0 = jnp.where(in_act, lo[grp] + (i - (cum - count)[grp]) * tm,
                     jnp.where(in_lead, a * tm, jnp.where(in_trail, local_hi + b * tm, 0)))
    v_lo = jnp.where(in_act, lo[grp], jnp.where(in_lead, 0, jnp.where(in_trail, local_hi, 0)))
    v_hi = jnp.where(in_act, hi[grp], jnp.where(in_lead, local_lo, jnp.where(in_trail, m, 0)))
    return RowSchedule(
        row0=row0.astype(jnp.int32),
        lo=v_lo.astype(jnp.int32),
        hi=v_hi.astype(jnp.int32),
        group=grp,
        compute=in_act.astype(jnp.int32),
    )
