"""The grouped-matmul seam of the MoE layer.

`grouped_matmul(lhs, rhs, group_sizes)` multiplies row group g of `lhs` (rows
sorted by group) by `rhs[g]`. Rows past `sum(group_sizes)` produce zeros.

Axis letters: the matrix letters of `ling_jax.model` (M rows, i.e. tokens
x top-k sorted by expert, K contraction, N output features, G groups, i.e.
experts, L local groups, see `group_offset`).

Implementations (`GmmImpl`, strings accepted):
  * `PALLAS`: the Pallas kernels of `pallas_kernels` (Mosaic on TPU, Triton on
    GPU), differentiable through their `custom_vjp`. On CPU they only run in
    the Pallas interpreter (the TPU kernel), which is for tests, not speed.
  * `XLA`: the fast CPU path below, with its own `custom_vjp`.
  * `RAGGED_DOT`: `jax.lax.ragged_dot` (fine on TPU/GPU; on CPU it expands to a
    dense product over all groups and runs at a few % of the dense rate).
  * `REFERENCE`: `pallas_kernels.reference` (a per-row gather of the weights); exact, memory-hungry,
    for tests on tiny shapes.
  * `AUTO`: `PALLAS` on TPU and GPU, `XLA` on CPU.

The XLA path. XLA:CPU multiplies dense matrices well (YNNPACK) but has no
grouped product, and several things cost more than the arithmetic here: a
dense product over all groups (what `ragged_dot` lowers to), padding every
group to a common capacity, and copies of big buffers (a `lax.cond`/`switch`
branch that updates a loop-carried buffer copies the whole buffer; fresh
multi-hundred-MB buffers are paid in page faults). So:
  * A `lax.scan` over the L local groups (the weight slice of the step comes
    from the scan, no per-row or per-tile weight gather). A group's rows are
    cut into full chunks of `_FULL` rows (a `fori_loop`, only for groups
    larger than `_FULL`) and one remainder chunk whose row count is rounded
    up to a bucket (multiples of 8 up to 128, of 16 up to 256): a
    `lax.switch` picks the dot of that static size. Padding is < 8 rows per
    group (< 1/8 for big remainders) instead of a whole tile, and every dot
    has at least a few dozen rows, where XLA:CPU runs near its dense rate.
  * The switch branches only *read* the big arrays and return the small
    `[_FULL, N]` product; the masked merge into the loop-carried output is
    outside the switch, so the output is updated in place.
  * The weight gradient (`tgmm_xla`) is the same scan, contracting over the
    rows of the group (masked rows are zero, so bucket padding is exact) and
    emitting `lhs_g^T @ dy_g` as the scan output: one write per group, no
    zero-initialised [L, K, N] accumulator and no read-modify-write. Its row
    chunks are multiplied in float32 (the transposed-lhs dot is not a
    YNNPACK GEMM, and XLA:CPU's fallback lacks bfloat16 kernels).
  * bfloat16 and big loop-invariant operands. XLA:CPU's float-normalization
    pass does not slice or update bfloat16 buffers: it converts the whole
    operand to float32 and slices that, and loop-invariant code motion then
    hoists the convert out of the loop, so each call wrote a float32 copy of
    the whole weight (738 MB at Ling-lite shapes). So the weight of a group is
    sliced inside a `lax.cond` branch (skipped for empty groups): code motion
    does not reach into branches, and the convert fuses with the slice and
    touches only that group's [K, N]. The rows (and the output) travel
    through the loops as uint16 bits, bit-cast back per slice (exact; one
    same-size copy of the [M, K] rows instead of a float32 one).
  * `custom_vjp`: forward `gmm`; backward `gmm` with the transposed weight
    (`dy @ rhs[g]^T` as a dot_general on the [K, N] slice, no transposed
    copy) and `tgmm_xla`. Integer inputs get no cotangent.
  Tried and dropped: one `fori_loop` per bucket instead of the switch (same
  speed, twice the compile time), and an explicit transpose so the weight
  gradient dot is a plain GEMM (no gain).

`group_offset` (all implementations): `group_sizes` is the global [G] row
count, `rhs` holds the L = rhs.shape[0] consecutive groups starting at global
group `group_offset`; rows of the other groups give zeros (and zero input
gradient). Passing local `group_sizes` [L] with offset 0 is the same thing for
a device that only holds its own rows. Requires `group_offset + L <= G`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels
from ling_jax.config import GmmImpl
from pallas_kernels.common import as_offset, compute_dtype, local_bounds, target_platform
from pallas_kernels.reference import gmm_reference

__all__ = ["GmmImpl", "gmm_xla", "grouped_matmul", "resolve_impl", "tgmm_xla"]


_STEP = 8  # Row granularity of the remainder buckets.
_FULL = 256  # Rows of a full chunk (and the largest bucket).
Carry = TypeVar("Carry")


def _buckets(m: int) -> tuple[int, ...]:
    """Static row counts of the remainder dots: 8, 16, ..., 128, 144, ..., 256 (capped at m)."""
    full = min(_FULL, m)
    sizes, c = [], _STEP
    while c < full:
        sizes.append(c)
        c += max(_STEP, 1 << max(0, c.bit_length() - 4))
    return (*sizes, full)


def _bucket_index(rem: jax.Array, buckets: tuple[int, ...]) -> jax.Array:
    """0 when `rem == 0`, else 1 + the index of the smallest bucket >= rem."""
    idx = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), rem, side="left")
    return jnp.where(rem > 0, idx + 1, 0).astype(jnp.int32)


class _GroupRows(NamedTuple):
    """One group's rows as the XLA path cuts them (see the module docstring).

    `num_full` chunks of `full` rows from `start` (a `fori_loop`), then the
    `rem` remaining rows from `r0`, multiplied as one bucket of static size
    read from an in-bounds window (a `lax.switch` over the buckets).
    """

    start: jax.Array
    num_full: jax.Array
    r0: jax.Array
    rem: jax.Array
    m: int  # rows of the whole operand
    buckets: tuple[int, ...]

    @classmethod
    def of(cls, start: jax.Array, size: jax.Array, m: int, buckets: tuple[int, ...]) -> _GroupRows:
        num_full = size // buckets[-1]
        done = num_full * buckets[-1]
        return cls(start, num_full, start + done, size - done, m, buckets)

    @property
    def full(self) -> int:
        """Rows of a full chunk (the largest bucket)."""
        return self.buckets[-1]

    def over_full_chunks(self, body: Callable[[jax.Array, Carry], Carry], init: Carry) -> Carry:
        """`body(first_row, carry)` for every full chunk, in order (no trip for groups under `full` rows)."""
        return lax.fori_loop(0, self.num_full, lambda i, carry: body(self.start + i * self.full, carry), init)

    def window(self, c: int) -> jax.Array:
        """First row of the in-bounds window of `c` rows that holds the remainder."""
        return jnp.clip(self.r0, 0, self.m - c)

    def mine(self, first_row: jax.Array, c: int) -> jax.Array:
        """[c, 1] True where row `first_row + i` is one of the remainder's rows."""
        rows = first_row + jnp.arange(c)
        return ((rows >= self.r0) & (rows < self.r0 + self.rem))[:, None]

    def remainder(self, zero: Callable[[], jax.Array], part: Callable[[int], jax.Array]) -> jax.Array:
        """`part(c)` for the smallest bucket c >= `rem` (a `lax.switch`); `zero()` when nothing remains."""
        branches = [zero, *(functools.partial(part, c) for c in self.buckets)]
        return lax.switch(_bucket_index(self.rem, self.buckets), branches)


def _group_bounds(group_sizes: jax.Array, group_offset: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
    """First row and row count of each local group."""
    starts, ends = local_bounds(group_sizes, group_offset, num_local)
    return starts, ends - starts


def _storage(dtype: jnp.dtype) -> jnp.dtype:
    """Loop-carried buffers hold bfloat16 as its uint16 bits: XLA:CPU updates a bfloat16
    buffer through float32 converts, which made bfloat16 runs 2x slower."""
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 else dtype


def _store(y: jax.Array, dtype: jnp.dtype) -> jax.Array:
    y = y.astype(dtype)
    return lax.bitcast_convert_type(y, jnp.uint16) if dtype == jnp.bfloat16 else y


def _load(y: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return lax.bitcast_convert_type(y, dtype) if dtype == jnp.bfloat16 else y


def _rows(stored: jax.Array, first_row: jax.Array, c: int, dtype: jnp.dtype) -> jax.Array:
    """Rows `first_row .. first_row + c - 1` of a `_store`d operand, in `dtype`."""
    return _load(lax.dynamic_slice_in_dim(stored, first_row, c), dtype)


def _gmm_xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
             transpose_rhs: bool = False, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """Forward grouped matmul on XLA (see the module docstring); not differentiable by itself."""
    m = lhs.shape[0]
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    cd = compute_dtype(lhs, rhs)
    buckets = _buckets(m)
    full = buckets[-1]
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    lhs_c = _store(lhs, cd)  # bfloat16 travels as uint16 bits (see `_storage`)
    starts, sizes = _group_bounds(group_sizes, group_offset, num_local)

    def mm(x: jax.Array, w: jax.Array) -> jax.Array:
        return _store(lax.dot_general(x, w, dims, preferred_element_type=jnp.float32), out_dtype)

    def weight(g: jax.Array) -> jax.Array:
        return lax.dynamic_index_in_dim(rhs, g, keepdims=False).astype(cd)

    def group(out: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        g, start, size = xs
        # The weight is sliced inside a branch (see the module docstring); empty groups skip it.
        w = lax.cond(size > 0, weight, lambda _: jnp.zeros(rhs.shape[1:], cd), g)
        rows = _GroupRows.of(start, size, m, buckets)

        def full_chunk(r: jax.Array, out: jax.Array) -> jax.Array:
            return lax.dynamic_update_slice_in_dim(out, mm(_rows(lhs_c, r, full, cd), w), r, 0)

        out = rows.over_full_chunks(full_chunk, out)
        # Merge window: `full` rows at wm (in bounds); a bucket of c rows is
        # computed at its own window wc and placed at wc - wm inside it.
        wm = rows.window(full)

        def part(c: int) -> jax.Array:
            wc = rows.window(c)
            y = mm(_rows(lhs_c, wc, c, cd), w)
            if c == full:
                return y
            return lax.dynamic_update_slice_in_dim(jnp.zeros((full, n), y.dtype), y, wc - wm, 0)

        y = rows.remainder(lambda: jnp.zeros((full, n), _storage(out_dtype)), part)
        old = lax.dynamic_slice_in_dim(out, wm, full)  # the masked merge, outside the switch
        return lax.dynamic_update_slice_in_dim(out, jnp.where(rows.mine(wm, full), y, old), wm, 0), None

    out, _ = lax.scan(group, jnp.zeros((m, n), _storage(out_dtype)), (jnp.arange(num_local), starts, sizes))
    return _load(out, out_dtype)


def tgmm_xla(lhs: jax.Array, dy: jax.Array, group_sizes: jax.Array,
             group_offset: jax.Array | int | None = None, *, num_groups: int | None = None,
             out_dtype: jnp.dtype | None = None) -> jax.Array:
    """Per-group `lhs_g^T @ dy_g` on XLA: [M, K], [M, N] -> [L, K, N] (the weight gradient).

    Args:
      lhs: [M, K] rows sorted by group.
      dy: [M, N] same rows.
      group_sizes: [G] int rows per group.
      group_offset: first global group to compute (default 0).
      num_groups: L, the number of local groups (default G).
      out_dtype: result dtype (default `lhs.dtype`); accumulation is float32.

    Returns:
      [L, K, N]; empty groups give zeros.
    """
    m, k = lhs.shape
    n = dy.shape[1]
    num_local = num_groups or group_sizes.shape[0]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    buckets = _buckets(m)
    starts, sizes = _group_bounds(group_sizes, as_offset(group_offset), num_local)
    lhs_s, dy_s = _store(lhs, lhs.dtype), _store(dy, dy.dtype)

    def chunk_product(r: jax.Array, c: int, mine: jax.Array | None = None) -> jax.Array:
        # Row chunks go to float32 after slicing: XLA:CPU's fast GEMM (YNNPACK)
        # does not take a transposed lhs, and its fallback has no bfloat16 x
        # bfloat16 -> float32 kernel; the chunks are small, so the cast is cheap.
        x = _rows(lhs_s, r, c, lhs.dtype).astype(jnp.float32)
        d = _rows(dy_s, r, c, dy.dtype).astype(jnp.float32)
        if mine is not None:
            x, d = jnp.where(mine, x, 0), jnp.where(mine, d, 0)
        return lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    def group(_: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        rows = _GroupRows.of(*xs, m, buckets)

        def part(c: int) -> jax.Array:
            wc = rows.window(c)
            return chunk_product(wc, c, rows.mine(wc, c))

        acc = rows.remainder(lambda: jnp.zeros((k, n), jnp.float32), part)
        acc = rows.over_full_chunks(lambda r, acc: acc + chunk_product(r, rows.full), acc)
        return None, _store(acc, out_dtype)

    _, out = lax.scan(group, None, (starts, sizes))
    return _load(out, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_xla_vjp(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
                 transpose_rhs: bool) -> jax.Array:
    return _gmm_xla(lhs, rhs, group_sizes, group_offset, transpose_rhs)


def _gmm_xla_fwd(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
                 transpose_rhs: bool) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out = _gmm_xla(lhs, rhs, group_sizes, group_offset, transpose_rhs)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_xla_bwd(transpose_rhs: bool, res: tuple[jax.Array, ...],
                 dy: jax.Array) -> tuple[jax.Array | None, ...]:
    lhs, rhs, group_sizes, group_offset = res
    dlhs = _gmm_xla(dy, rhs, group_sizes, group_offset, not transpose_rhs, out_dtype=lhs.dtype)
    a, b = (dy, lhs) if transpose_rhs else (lhs, dy)
    drhs = tgmm_xla(a, b, group_sizes, group_offset, num_groups=rhs.shape[0], out_dtype=rhs.dtype)
    return dlhs, drhs, None, None


_gmm_xla_vjp.defvjp(_gmm_xla_fwd, _gmm_xla_bwd)


def gmm_xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
            transpose_rhs: bool = False) -> jax.Array:
    """The differentiable XLA grouped matmul (`GmmImpl.XLA`)."""
    return _gmm_xla_vjp(lhs, rhs, group_sizes, group_offset, transpose_rhs)


def gmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   group_offset: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot` over the local groups, rows outside them zeroed."""
    m = lhs.shape[0]
    num_local = rhs.shape[0]
    starts, sizes = _group_bounds(group_sizes, group_offset, num_local)
    if num_local == group_sizes.shape[0]:  # Local groups start at row 0 (offset must be 0).
        out = lax.ragged_dot(lhs, rhs, sizes)
    else:  # Rotate the local rows to the top, multiply, rotate back.
        out = lax.ragged_dot(jnp.roll(lhs, -starts[0], axis=0), rhs, sizes)
        out = jnp.roll(out, starts[0], axis=0)
    rows = jnp.arange(m)
    valid = (rows >= starts[0]) & (rows < starts[-1] + sizes[-1])
    return jnp.where(valid[:, None], out, 0).astype(lhs.dtype)


def _gmm_pallas(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                group_offset: jax.Array) -> jax.Array:
    """The Pallas kernels for the target platform (the interpreter when that is the CPU)."""
    return pallas_kernels.gmm(lhs, rhs, group_sizes, group_offset, interpret=target_platform() == "cpu")


def resolve_impl(impl: GmmImpl | str) -> GmmImpl:
    """Maps `AUTO` (or its string) to the implementation for the target platform (the mesh's devices)."""
    impl = GmmImpl(impl)
    if impl is not GmmImpl.AUTO:
        return impl
    return GmmImpl.XLA if target_platform() == "cpu" else GmmImpl.PALLAS


_IMPLS = {
    GmmImpl.PALLAS: _gmm_pallas,
    GmmImpl.XLA: gmm_xla,
    GmmImpl.RAGGED_DOT: gmm_ragged_dot,
    GmmImpl.REFERENCE: gmm_reference,
}


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: GmmImpl | str = GmmImpl.AUTO,
    group_offset: jax.Array | int | None = None,
) -> jax.Array:
    """Grouped matmul: row group g of `lhs` [M, K] times `rhs[g - group_offset]` [K, N].

    Differentiable (`jax.grad`) with respect to `lhs` and `rhs` for every impl.

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [L, K, N] one weight per local group (L = G without an offset).
      group_sizes: [G] int rows per group; rows past their sum give zeros.
      impl: a `GmmImpl` (or its value string).
      group_offset: global id of `rhs[0]` (default 0); rows of groups outside
        `[group_offset, group_offset + L)` give zeros.

    Returns:
      [M, N] in `lhs.dtype`, accumulated in float32.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul needs lhs [M, K] and rhs [G, K, N]; got {lhs.shape} and {rhs.shape}")
    if group_sizes.ndim != 1 or group_sizes.shape[0] < rhs.shape[0]:
        raise ValueError(f"group_sizes must be [G >= {rhs.shape[0]}], got {group_sizes.shape}")
    if group_offset is None and group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(f"group_sizes {group_sizes.shape} has more groups than rhs {rhs.shape}: "
                         "pass group_offset for local groups")
    return _IMPLS[resolve_impl(impl)](lhs, rhs, group_sizes.astype(jnp.int32), as_offset(group_offset))
