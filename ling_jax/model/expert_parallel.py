"""Expert parallelism: the routed experts of an MoE layer under `jax.shard_map` over the whole mesh.

Design, exchange volumes and the gradient argument: docs/expert_parallel.md.
In short, every device sorts its tokens' (token, slot) rows by expert, sends
each row to the device owning its expert (`Exchange.RAGGED`: one
`ragged_all_to_all`; `Exchange.PADDED`: fixed-size `all_to_all` blocks, then
a local re-sort), runs the one routed-expert FFN of `ling_jax.model.experts`
on the rows of its own experts, and sends the results back the same way.
Notation as in that document: `shards` is e, the size of the expert mesh
axis; `per_shard` is El = E / e, the experts of one device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from ling_jax.config import Exchange, GmmImpl
from ling_jax.model.experts import Dispatch, Dispatched, local_dispatch, routed_ffn
from ling_jax.model.sharding import (
    DATA_AXES,
    EXPERT_AXIS,
    FSDP_AXIS,
    MESH_AXES,
    TENSOR_AXIS,
    ShardingError,
)
from pallas_kernels.common import target_platform

RaggedAllToAll = Callable[..., jax.Array]


def resolve_exchange(exchange: Exchange | str) -> Exchange:
    """Maps `AUTO` to the exchange the target platform (the mesh's devices) implements."""
    exchange = Exchange(exchange)
    if exchange is not Exchange.AUTO:
        return exchange
    return Exchange.PADDED if target_platform() == "cpu" else Exchange.RAGGED


def ragged_all_to_all_reference(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                                send_sizes: jax.Array, output_offsets: jax.Array, recv_sizes: jax.Array, *,
                                axis_name: str) -> jax.Array:
    """`jax.lax.ragged_all_to_all` semantics from `all_gather` and gathers (any backend; tests).

    Every device gathers all operands and offsets (e times the memory of the
    real collective), then picks the slices addressed to it. `recv_sizes` is
    implied by the senders' `send_sizes` and is not read.
    """
    del recv_sizes
    e = jax.lax.axis_size(axis_name)
    me = jax.lax.axis_index(axis_name)
    per = input_offsets.shape[0] // e  # slices per destination
    n = operand.shape[0]
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name)
    src_all = gather(operand).reshape(e * n, *operand.shape[1:])  # [e * N, ...]
    mine = lambda a: jax.lax.dynamic_slice_in_dim(gather(a), me * per, per, axis=1).reshape(-1)  # noqa: E731
    in_off, size, out_off = mine(input_offsets), mine(send_sizes), mine(output_offsets)  # [e * per]
    source = jnp.repeat(jnp.arange(e), per)
    p = jnp.arange(output.shape[0])[:, None]  # [P, 1] output rows
    hit = (p >= out_off) & (p < out_off + size)  # [P, e * per]
    slot = jnp.argmax(hit, axis=1)
    src = source[slot] * n + in_off[slot] + p[:, 0] - out_off[slot]
    got = jnp.take(src_all, jnp.where(jnp.any(hit, axis=1), src, e * n), axis=0, mode="fill", fill_value=0)
    keep = jnp.any(hit, axis=1).reshape(-1, *(1,) * (output.ndim - 1))
    return jnp.where(keep, got, output)


def _exclusive_cumsum(a: jax.Array, axis: int) -> jax.Array:
    return jnp.cumsum(a, axis=axis) - a


def _ragged_dispatch(rows: jax.Array, counts: jax.Array, shards: int, buffer: int,
                     collective: RaggedAllToAll) -> Dispatched:
    """RAGGED exchange of sorted rows [M_l, D] -> expert-major buffer [buffer, D], local sizes [El], and the return."""
    num_experts = counts.shape[0]
    per_shard = num_experts // shards
    shard = jax.lax.axis_index(EXPERT_AXIS)
    by_source = jax.lax.all_gather(counts, EXPERT_AXIS)  # [e, E] rows of each source for each expert
    expert_rows = jnp.sum(by_source, axis=0)  # [E]
    # Where expert g starts in its owner's buffer, and the rows of g from earlier sources.
    expert_start = _exclusive_cumsum(expert_rows.reshape(shards, per_shard), 1).reshape(num_experts)
    earlier = _exclusive_cumsum(by_source, 0)  # [e, E]
    mine = lambda a: jax.lax.dynamic_slice_in_dim(a, shard * per_shard, per_shard, axis=a.ndim - 1)  # noqa: E731
    recv_sizes = mine(by_source).reshape(num_experts)  # slice src * El + l: rows of my expert l from source src
    out_offsets = expert_start + jnp.take(earlier, shard, axis=0)
    recv = collective(rows, jnp.zeros((buffer, rows.shape[1]), rows.dtype), _exclusive_cumsum(counts, 0), counts,
                      out_offsets, recv_sizes, axis_name=EXPERT_AXIS)

    def back(out: jax.Array) -> jax.Array:  # [buffer, D] -> [M_l, D]
        in_offsets = (mine(expert_start)[None] + mine(earlier)).reshape(num_experts)
        src_offsets = mine(_exclusive_cumsum(by_source, 1)).reshape(num_experts)  # where each source keeps the rows
        return collective(out, jnp.zeros(rows.shape, out.dtype), in_offsets, recv_sizes, src_offsets, counts,
                          axis_name=EXPERT_AXIS)

    return recv, mine(expert_rows), back


def _padded_receive_maps(from_source: jax.Array, cap: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The re-sort of received PADDED blocks into expert-major order, and its inverse.

    Args:
      from_source: [e, El] rows of each local expert in each source's block
        (a block holds the source's rows expert by expert, then padding).
      cap: rows per block.

    Returns:
      `gather` [e * cap]: the received row at each expert-major position
      (e * cap, out of range, for the empty tail); `scatter` [e * cap]: the
      expert-major position of each received row (e * cap for padding); and
      the rows of each local expert [El].
    """
    shards, per_shard = from_source.shape
    buffer = shards * cap
    expert_rows = jnp.sum(from_source, axis=0)  # [El]
    expert_start = _exclusive_cumsum(expert_rows, 0)
    earlier = _exclusive_cumsum(from_source, 0)  # [e, El] rows of each expert from earlier sources
    in_block = _exclusive_cumsum(from_source, 1)  # [e, El] where each expert starts inside a source's block

    # Expert-major position -> (source, row of its block).
    position = jnp.arange(buffer)
    expert = jnp.clip(jnp.searchsorted(jnp.cumsum(expert_rows), position, side="right"), 0, per_shard - 1)
    offset = position - expert_start[expert]  # among the expert's rows
    source = jnp.sum(jnp.cumsum(from_source, axis=0)[:, expert] <= offset[None], axis=0)
    source = jnp.clip(source, 0, shards - 1)
    received = source * cap + in_block[source, expert] + offset - earlier[source, expert]
    gather = jnp.where(position < jnp.sum(expert_rows), received, buffer)

    # (source, row of its block) -> expert-major position.
    block, block_row = jnp.arange(buffer) // cap, jnp.arange(buffer) % cap
    expert_of = jnp.sum(jnp.cumsum(from_source, axis=1)[block] <= block_row[:, None], axis=1)
    expert_of = jnp.clip(expert_of, 0, per_shard - 1)
    target = expert_start[expert_of] + earlier[block, expert_of] + block_row - in_block[block, expert_of]
    scatter = jnp.where(block_row < jnp.sum(from_source, axis=1)[block], target, buffer)
    return gather, scatter, expert_rows


def _padded_dispatch(rows: jax.Array, counts: jax.Array, shards: int, cap: int) -> Dispatched:
    """PADDED exchange of sorted rows [M_l, D] -> expert-major buffer [e * cap, D], local sizes [El], and the return."""
    num_rows = rows.shape[0]
    to_owner = counts.reshape(shards, -1)  # [e, El] rows I send to each owner, per its local expert
    send_sizes = jnp.sum(to_owner, axis=1)  # [e]
    send_offsets = _exclusive_cumsum(send_sizes, 0)
    slot = jnp.arange(cap)
    picked = jnp.where(slot < send_sizes[:, None], send_offsets[:, None] + slot, num_rows).reshape(-1)  # [e * cap]
    send = jnp.take(rows, picked, axis=0, mode="fill", fill_value=0)  # [e * cap, D]: block j for owner j
    recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)  # block src: from source src
    from_source = jax.lax.all_to_all(to_owner, EXPERT_AXIS, 0, 0, tiled=True)  # [e, El]
    gather, scatter, expert_rows = _padded_receive_maps(from_source, cap)
    sorted_rows = jnp.take(recv, gather, axis=0, mode="fill", fill_value=0)
    owner = jnp.clip(jnp.searchsorted(jnp.cumsum(send_sizes), jnp.arange(num_rows), side="right"), 0, shards - 1)
    home = owner * cap + jnp.arange(num_rows) - send_offsets[owner]  # where my sorted row comes back

    def back(out: jax.Array) -> jax.Array:  # [e * cap, D] -> [M_l, D]
        blocks_out = jnp.take(out, scatter, axis=0, mode="fill", fill_value=0)  # [e * cap, D] by source
        returned = jax.lax.all_to_all(blocks_out, EXPERT_AXIS, 0, 0, tiled=True)  # block j: from owner j
        return jnp.take(returned, home, axis=0)

    return sorted_rows, expert_rows, back


def _local_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array, wg: jax.Array, wu: jax.Array,
               wd: jax.Array, *, sizes: dict[str, int], num_experts: int, impl: GmmImpl, exchange: Exchange,
               collective: RaggedAllToAll) -> jax.Array:
    """One device's part of `expert_parallel_ffn` (inside `shard_map`; `sizes` holds the mesh's axes)."""
    shards, fsdp = sizes.get(EXPERT_AXIS, 1), sizes.get(FSDP_AXIS, 1)
    cap = x.shape[0] * min(experts.shape[1], num_experts // shards)  # the most rows one device sends another
    if fsdp > 1:  # FSDP: gather the D axis of the local experts.
        wg, wu = (jax.lax.all_gather(w, FSDP_AXIS, axis=1, tiled=True) for w in (wg, wu))  # [El, D, F/t]
        wd = jax.lax.all_gather(wd, FSDP_AXIS, axis=2, tiled=True)  # [El, F/t, D]
    dispatch: Dispatch = local_dispatch
    if shards > 1 and exchange is Exchange.RAGGED:
        dispatch = functools.partial(_ragged_dispatch, shards=shards, buffer=shards * cap, collective=collective)
    elif shards > 1:
        dispatch = functools.partial(_padded_dispatch, shards=shards, cap=cap)
    y = routed_ffn(x, weights, experts, wg, wu, wd, num_experts=num_experts, impl=impl,
                   dispatch=dispatch)  # [X_l, D], partial sums over tensor
    if TENSOR_AXIS in sizes:
        y = jax.lax.psum(y, TENSOR_AXIS)
    return y.astype(x.dtype)


def expert_parallel_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array, wg: jax.Array, wu: jax.Array,
                        wd: jax.Array, *, mesh: Mesh | AbstractMesh | None = None, impl: GmmImpl = GmmImpl.AUTO,
                        exchange: Exchange = Exchange.AUTO, collective: RaggedAllToAll | None = None) -> jax.Array:
    """The routed experts of an MoE layer, expert-parallel over the mesh (see docs/expert_parallel.md).

    Args:
      x: [X, D] tokens.
      weights: [X, k] float32 router weights of the chosen experts.
      experts: [X, k] int32 chosen experts.
      wg, wu: [E, D, F] gate and up projections (in the compute dtype).
      wd: [E, F, D] down projection.
      mesh: the mesh (default: the one set with `jax.set_mesh`); its axes must be among `MESH_AXES`.
      impl: the grouped matmul (`ling_jax.model.grouped_matmul`).
      exchange: how rows move between expert shards.
      collective: the RAGGED collective (default `jax.lax.ragged_all_to_all`;
        `ragged_all_to_all_reference` runs it on backends without one).

    Returns:
      [X, D] in `x.dtype`: sum over k of weight * expert(x), as the single-device layer.

    Raises:
      ShardingError: unknown mesh axes, or experts / ffn / hidden sizes the mesh does not divide.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    unknown = set(mesh.axis_names) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"expert parallelism needs a mesh with axes among {MESH_AXES}; "
                            f"this one also has {sorted(unknown)}")
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    X, D = x.shape
    E, F = wg.shape[0], wg.shape[2]
    for what, n, axis in (("num_experts", E, EXPERT_AXIS), ("moe_intermediate_size", F, TENSOR_AXIS),
                          ("hidden_size", D, FSDP_AXIS)):
        if n % sizes.get(axis, 1):
            raise ShardingError(f"{what} ({n}) is not divisible by mesh axis {axis!r} (size {sizes[axis]})")
    present = lambda *names: tuple(a for a in names if a in sizes) or None  # noqa: E731
    tokens = PartitionSpec(present(*DATA_AXES), None)
    pad = -X % math.prod(sizes.get(a, 1) for a in DATA_AXES)  # padded tokens: expert 0, weight 0
    if pad:
        x, weights, experts = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, weights, experts))
    w_in = PartitionSpec(*(present(a) for a in (EXPERT_AXIS, FSDP_AXIS, TENSOR_AXIS)))
    w_out = PartitionSpec(*(present(a) for a in (EXPERT_AXIS, TENSOR_AXIS, FSDP_AXIS)))
    body = functools.partial(_local_ffn, sizes=sizes, num_experts=E, impl=impl, exchange=resolve_exchange(exchange),
                             collective=collective or jax.lax.ragged_all_to_all)
    y = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out), out_specs=tokens,
                      check_vma=False)(x, weights.astype(jnp.float32), experts.astype(jnp.int32), wg, wu, wd)
    return y[:X]
