"""The grouped-matmul seam of the MoE layer.

`grouped_matmul(lhs, rhs, group_sizes)` multiplies row group g of `lhs` (rows
sorted by group) by `rhs[g]`. Rows past `sum(group_sizes)` produce zeros.

Axis letters: M rows (tokens x top-k, sorted by expert), K contraction,
N output features, G groups (experts), L local groups (see `group_offset`).

Implementations (`GmmImpl`, strings accepted):
  * `PALLAS`: the Pallas kernels of `pallas_kernels` (Mosaic on TPU, Triton on
    GPU), differentiable through their `custom_vjp`. On CPU they only run in
    the Pallas interpreter (the TPU kernel), which is for tests, not speed.
  * `XLA`: the fast CPU path below, with its own `custom_vjp`.
  * `RAGGED_DOT`: `jax.lax.ragged_dot` (fine on TPU/GPU; on CPU it expands to a
    dense product over all groups and runs at a few % of the dense rate).
  * `REFERENCE`: per-row gather of the group's weight; exact, memory-hungry,
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

import jax
import jax.numpy as jnp
from jax import lax

import pallas_kernels
from ling_jax.config import GmmImpl

__all__ = ["GmmImpl", "gmm_xla", "grouped_matmul", "resolve_impl", "tgmm_xla"]


_STEP = 8  # Row granularity of the remainder buckets.
_FULL = 256  # Rows of a full chunk (and the largest bucket).


def _buckets(m: int) -> tuple[int, ...]:
    """Static row counts of the remainder dots: 8, 16, ..., 128, 144, ..., 256 (capped at m)."""
    full = min(_FULL, m)
    sizes, c = [], _STEP
    while c < full:
        sizes.append(c)
        c += max(_STEP, 1 << max(0, c.bit_length() - 4))
    return (*sizes, full)


def _bounds(group_sizes: jax.Array, group_offset: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
    """First row and row count of each local group."""
    sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    return (lax.dynamic_slice_in_dim(starts, group_offset, num_local),
            lax.dynamic_slice_in_dim(sizes, group_offset, num_local))


def _bucket_index(rem: jax.Array, buckets: tuple[int, ...]) -> jax.Array:
    """0 when `rem == 0`, else 1 + the index of the smallest bucket >= rem."""
    idx = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), rem, side="left")
    return jnp.where(rem > 0, idx + 1, 0).astype(jnp.int32)


def _storage(dtype: jnp.dtype) -> jnp.dtype:
    """Loop-carried buffers hold bfloat16 as its uint16 bits: XLA:CPU updates a bfloat16
    buffer through float32 converts, which made bfloat16 runs 2x slower."""
    return jnp.dtype(jnp.uint16) if dtype == jnp.bfloat16 else dtype


def _store(y: jax.Array, dtype: jnp.dtype) -> jax.Array:
    y = y.astype(dtype)
    return lax.bitcast_convert_type(y, jnp.uint16) if dtype == jnp.bfloat16 else y


def _load(y: jax.Array, dtype: jnp.dtype) -> jax.Array:
    return lax.bitcast_convert_type(y, dtype) if dtype == jnp.bfloat16 else y


def _compute_dtype(a: jnp.dtype, b: jnp.dtype) -> jnp.dtype:
    both_bf16 = a == jnp.bfloat16 and b == jnp.bfloat16
    return jnp.dtype(jnp.bfloat16 if both_bf16 else jnp.float32)


def _gmm_xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: jax.Array,
             transpose_rhs: bool = False, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """Forward grouped matmul on XLA (see the module docstring); not differentiable by itself."""
    m = lhs.shape[0]
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    cd = _compute_dtype(lhs.dtype, rhs.dtype)
    buckets = _buckets(m)
    full = buckets[-1]
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    lhs_c = _store(lhs, cd)  # bfloat16 travels as uint16 bits (see `_storage`)
    starts, sizes = _bounds(group_sizes, group_offset, num_local)

    def mm(x: jax.Array, w: jax.Array) -> jax.Array:
        return _store(lax.dot_general(x, w, dims, preferred_element_type=jnp.float32), out_dtype)

    def weight(g: jax.Array) -> jax.Array:
        return lax.dynamic_index_in_dim(rhs, g, keepdims=False).astype(cd)

    def group(out: jax.Array, xs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        g, start, size = xs
        # The weight is sliced inside a branch (see the module docstring); empty groups skip it.
        w = lax.cond(size > 0, weight, lambda _: jnp.zeros(rhs.shape[1:], cd), g)
        num_full = size // full

        def full_chunk(i: jax.Array, out: jax.Array) -> jax.Array:
            r0 = start + i * full
            y = mm(_load(lax.dynamic_slice_in_dim(lhs_c, r0, full), cd), w)
            return lax.dynamic_update_slice_in_dim(out, y, r0, 0)

        out = lax.fori_loop(0, num_full, full_chunk, out)
        r0 = start + num_full * full
        rem = size - num_full * full
        # Merge window: `full` rows at wm (in bounds); a bucket of c rows is
        # computed at wc (in bounds) and placed at wc - wm inside the window.
        wm = jnp.clip(r0, 0, m - full)

        def part(c: int) -> jax.Array:
            wc = jnp.clip(r0, 0, m - c)
            y = mm(_load(lax.dynamic_slice_in_dim(lhs_c, wc, c), cd), w)
            if c == full:
                return y
            return lax.dynamic_update_slice_in_dim(jnp.zeros((full, n), y.dtype), y, wc - wm, 0)

        branches = [lambda: jnp.zeros((full, n), _storage(out_dtype))]
        branches += [functools.partial(part, c) for c in buckets]
        y = lax.switch(_bucket_index(rem, buckets), branches)
        rows = wm + jnp.arange(full)
        mine = ((rows >= r0) & (rows < r0 + rem))[:, None]
        old = lax.dynamic_slice_in_dim(out, wm, full)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(mine, y, old), wm, 0), None

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
    full = buckets[-1]
    offset = jnp.zeros((), jnp.int32) if group_offset is None else jnp.asarray(group_offset, jnp.int32)
    starts, sizes = _bounds(group_sizes, offset, num_local)
    lhs_s, dy_s = _store(lhs, lhs.dtype), _store(dy, dy.dtype)

    def rows_of(a: jax.Array, like: jax.Array, r: jax.Array, c: int) -> jax.Array:
        # Row chunks go to float32 after slicing: XLA:CPU's fast GEMM (YNNPACK)
        # does not take a transposed lhs, and its fallback has no bfloat16 x
        # bfloat16 -> float32 kernel; the chunks are small, so the cast is cheap.
        return _load(lax.dynamic_slice_in_dim(a, r, c), like.dtype).astype(jnp.float32)

    def tn(x: jax.Array, d: jax.Array) -> jax.Array:
        return lax.dot_general(x, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    def group(_: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, jax.Array]:
        start, size = xs
        num_full = size // full
        r0 = start + num_full * full
        rem = size - num_full * full

        def part(c: int) -> jax.Array:
            wc = jnp.clip(r0, 0, m - c)
            rows = wc + jnp.arange(c)
            mine = ((rows >= r0) & (rows < r0 + rem))[:, None]
            x = jnp.where(mine, rows_of(lhs_s, lhs, wc, c), 0)
            d = jnp.where(mine, rows_of(dy_s, dy, wc, c), 0)
            return tn(x, d)

        branches = [lambda: jnp.zeros((k, n), jnp.float32)]
        branches += [functools.partial(part, c) for c in buckets]
        acc = lax.switch(_bucket_index(rem, buckets), branches)

        def full_chunk(i: jax.Array, acc: jax.Array) -> jax.Array:
            r = start + i * full
            return acc + tn(rows_of(lhs_s, lhs, r, full), rows_of(dy_s, dy, r, full))

        acc = lax.fori_loop(0, num_full, full_chunk, acc)
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


def _row_groups(group_sizes: jax.Array, group_offset: jax.Array, num_local: int,
                m: int) -> tuple[jax.Array, jax.Array]:
    """Local group index of every row (clamped) and whether the row lies in a local group."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    rows = jnp.arange(m)
    gid = jnp.searchsorted(ends, rows, side="right") - group_offset
    valid = (gid >= 0) & (gid < num_local) & (rows < ends[-1])
    return jnp.clip(gid, 0, num_local - 1), valid


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                  group_offset: jax.Array) -> jax.Array:
    """Row-by-row reference: out[m] = lhs[m] @ rhs[group(m)]. Tiny shapes only."""
    gid, valid = _row_groups(group_sizes, group_offset, rhs.shape[0], lhs.shape[0])
    out = jnp.einsum("mk,mkn->mn", lhs, rhs[gid], preferred_element_type=jnp.float32)
    return jnp.where(valid[:, None], out, 0).astype(lhs.dtype)


def gmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array,
                   group_offset: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot` over the local groups, rows outside them zeroed."""
    m = lhs.shape[0]
    num_local = rhs.shape[0]
    starts, sizes = _bounds(group_sizes, group_offset, num_local)
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
    """The Pallas kernels for the running backend (the interpreter on CPU)."""
    return pallas_kernels.gmm(lhs, rhs, group_sizes, group_offset,
                              interpret=jax.default_backend() == "cpu")


def resolve_impl(impl: GmmImpl | str) -> GmmImpl:
    """Maps `AUTO` (or its string) to the implementation for the default backend."""
    impl = GmmImpl(impl)
    if impl is not GmmImpl.AUTO:
        return impl
    return GmmImpl.XLA if jax.default_backend() == "cpu" else GmmImpl.PALLAS


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
    offset = jnp.zeros((), jnp.int32) if group_offset is None else jnp.asarray(group_offset, jnp.int32)
    return _IMPLS[resolve_impl(impl)](lhs, rhs, group_sizes.astype(jnp.int32), offset)
