"""The grouped-matmul seam of the MoE layer.

`grouped_matmul(lhs, rhs, group_sizes)` multiplies row group g of `lhs` (rows
sorted by group) by `rhs[g]`. Rows past `sum(group_sizes)` produce zeros.

Axis letters: M rows (tokens x top-k, sorted by expert), K contraction,
N output features, G groups (experts).

Implementations (`GmmImpl`):
  * `REFERENCE`: per-row gather of the group's weight; exact, memory-hungry,
    for tests on tiny shapes.
  * `XLA`: rows are padded per group to whole tiles, then a `lax.scan` over the
    tiles multiplies each by its group's weight. Only the rows that exist are
    computed (plus per-group tile padding), never every expert for every row.
  * `RAGGED_DOT`: `jax.lax.ragged_dot` (good on TPU/GPU, dense on CPU).
  * `AUTO`: the best available implementation for the running backend.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp


class GmmImpl(enum.Enum):
    """Which grouped-matmul implementation the MoE layer uses."""

    AUTO = "auto"
    XLA = "xla"
    RAGGED_DOT = "ragged_dot"
    REFERENCE = "reference"


def _row_groups(group_sizes: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """Group id of every row and whether the row lies inside some group."""
    ends = jnp.cumsum(group_sizes)
    rows = jnp.arange(m)
    gid = jnp.searchsorted(ends, rows, side="right")
    valid = rows < ends[-1]
    return jnp.minimum(gid, group_sizes.shape[0] - 1), valid


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Row-by-row reference: out[m] = lhs[m] @ rhs[group(m)]. Tiny shapes only."""
    gid, valid = _row_groups(group_sizes, lhs.shape[0])
    out = jnp.einsum("mk,mkn->mn", lhs, rhs[gid], preferred_element_type=jnp.float32)
    return jnp.where(valid[:, None], out, 0).astype(lhs.dtype)


def _tile_rows(m: int, g: int) -> int:
    """Rows per tile: about the mean group size, a power of two in [8, 128]."""
    mean = max(1, -(-m // g))
    return int(min(128, max(8, 1 << (mean - 1).bit_length())))


def gmm_xla(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Tile-padded grouped matmul: a `lax.scan` of dense [tm, K] @ [K, N] products."""
    m, _ = lhs.shape
    g, _, n = rhs.shape
    tm = _tile_rows(m, g)
    num_tiles = -(-m // tm) + g  # static bound on sum(ceil(size / tm))
    group_sizes = group_sizes.astype(jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    padded = (group_sizes + tm - 1) // tm * tm
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded

    # Padded slot p holds row starts[g] + (p - padded_starts[g]) when that is inside group g.
    slots = jnp.arange(num_tiles * tm)
    slot_gid = jnp.minimum(jnp.searchsorted(padded_ends, slots, side="right"), g - 1)
    offset = slots - padded_starts[slot_gid]
    slot_valid = (offset < group_sizes[slot_gid]) & (slots < padded_ends[-1])
    src = jnp.where(slot_valid, starts[slot_gid] + offset, 0)
    x = jnp.where(slot_valid[:, None], lhs[src], 0).reshape(num_tiles, tm, -1)
    tile_gid = slot_gid[::tm]

    def tile(_, xs):
        xt, gi = xs
        w = jax.lax.dynamic_index_in_dim(rhs, gi, axis=0, keepdims=False)
        return None, jnp.dot(xt, w, preferred_element_type=jnp.float32).astype(lhs.dtype)

    _, y = jax.lax.scan(tile, None, (x, tile_gid))
    y = y.reshape(num_tiles * tm, n)

    row_gid, row_valid = _row_groups(group_sizes, m)
    dst = padded_starts[row_gid] + jnp.arange(m) - starts[row_gid]
    return jnp.where(row_valid[:, None], y[jnp.where(row_valid, dst, 0)], 0)


def gmm_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot`, with rows past the last group zeroed."""
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
    _, valid = _row_groups(group_sizes, lhs.shape[0])
    return jnp.where(valid[:, None], out, 0)


def resolve_impl(impl: GmmImpl | str) -> GmmImpl:
    """Maps `AUTO` (or its string) to the implementation for the default backend."""
    impl = GmmImpl(impl)
    if impl is not GmmImpl.AUTO:
        return impl
    return GmmImpl.XLA if jax.default_backend() == "cpu" else GmmImpl.RAGGED_DOT


_IMPLS = {
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
) -> jax.Array:
    """Grouped matmul: row group g of `lhs` [M, K] times `rhs[g]` [K, N].

    Args:
      lhs: [M, K] rows sorted by group.
      rhs: [G, K, N] one weight per group.
      group_sizes: [G] int rows per group; rows past their sum give zeros.
      impl: a `GmmImpl` (or its value string).

    Returns:
      [M, N] in `lhs.dtype`, accumulated in float32.
    """
    if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul needs lhs [M, K] and rhs [G, K, N]; got {lhs.shape} and {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"group_sizes must be [G={rhs.shape[0]}], got {group_sizes.shape}")
    return _IMPLS[resolve_impl(impl)](lhs, rhs, group_sizes)
