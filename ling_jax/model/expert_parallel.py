"""Token dispatch for the MoE layer: sorting rows by expert, and expert parallelism over a mesh.

Axis letters as in `ling_jax.layers`; here also X tokens, k the top-k slot,
M = X * k routed rows, e the size of the `expert` mesh axis, El = E / e
experts per device, t the size of the `tensor` axis, f that of `fsdp`, and
the suffix `_l` for one device's share (X_l = X / (data * fsdp * e)).

`permute` / `unpermute` sort the (token, slot) rows by expert and back; the
single-device MoE uses them directly.

`expert_parallel_ffn` runs the routed experts under `jax.shard_map` over the
whole mesh (`ling_jax.sharding.MESH_AXES`). Each device holds X_l tokens
(split over data, fsdp and expert; replicated over tensor), their router
weights and expert ids (routing is done before, per token, so it is local),
and the weights of its El experts, `[El, D/f, F/t]` (down: `[El, F/t, D/f]`).
Per MoE layer, each device:

1. gathers its experts' weights over `fsdp` (`all_gather`, so the weight
   gradient is a reduce-scatter): receives 3 * El * D * F/t * (f-1)/f values;
2. sorts its M_l = X_l * k rows by expert (`permute`) and counts them per
   expert, `counts [E]`;
3. exchanges the counts over `expert` (RAGGED: `all_gather`, e * E int32;
   PADDED: `all_to_all`, E int32);
4. sends every row to the device that owns its expert and receives the rows
   for its own experts into a buffer of R = e * X_l * min(k, El) rows (the
   worst case: all e peers send all their rows to this device; dropless),
   sorted by local expert, then by source device;
5. runs the grouped matmuls (gate, up: `[R, D] -> [R, F/t]`; SwiGLU; down:
   `[R, F/t] -> [R, D]`, a partial sum over the tensor shards) with the El
   local group sizes (rows past their sum cost nothing and give zeros);
6. sends the results back the same way (the reverse exchange);
7. un-sorts them, weights them with the router weights and sums the k slots
   in float32 exactly as the single-device layer does, then sums the partial
   products over `tensor` (`psum` of X_l * D float32 values).

The two exchanges (`Exchange`):

* `RAGGED`: `jax.lax.ragged_all_to_all` with one slice per expert (E slices;
  slice g goes to device g // El and lands at its place in the receiver's
  expert-major buffer), so the receiver needs no local re-sort. Each device
  sends exactly its M_l * D values per direction (the rows of its own
  experts stay local); what it receives varies with the routing, at most R * D.
  Its transpose is the reverse exchange, so gradients cost the same again.
  XLA:CPU does not implement the collective (it lowers, but does not compile).
* `PADDED`: `jax.lax.all_to_all` of fixed blocks: each device sends one block
  of cap = X_l * min(k, El) rows to each of the e devices (send and receive
  buffers `[e * cap, D]`, i.e. R rows, zero-padded), then gathers the received
  rows into the same expert-major order locally. It always sends and receives
  e * cap * D values per direction ((e - 1) * cap * D of them leave the
  device), e * min(k, El) / k times the RAGGED volume (8x for Ling-lite,
  E = 64, k = 6, e = 8), but it is exact and runs everywhere.
* `AUTO`: RAGGED on TPU and GPU, PADDED on CPU.

Gradients: every collective here has a transpose (`all_to_all` and
`ragged_all_to_all` run the exchange in reverse, `all_gather` becomes a
`psum_scatter` over `fsdp`). The map runs with `check_vma=False` because the
grouped-matmul kernels carry loop state that is not typed per mesh axis;
`shard_map` then sums the cotangent of every input over the mesh axes its
spec does not name (the expert weights over `data`, the tokens over `tensor`)
and divides the cotangent of the tensor-replicated output by t, which the
transpose of the final `psum` undoes. The backward pass therefore sends the
same exchange volumes as the forward pass, plus the reduce-scatter of
3 * El * D * F/t weight-gradient values over `fsdp`, the all-reduce of the
3 * El * D/f * F/t local shard over `data`, and the all-reduce of the token
gradients (X_l * D, and X_l * k router weights) over `tensor`. Values are in
the compute dtype except the float32 combine and its `psum`.

Padding: when X does not divide by data * fsdp * e, the tokens are padded
(router weight 0, expert 0) and the padding is cut off the result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from ling_jax.config import Exchange, GmmImpl
from ling_jax.model.grouped_matmul import grouped_matmul
from ling_jax.model.sharding import DATA_AXES, MESH_AXES, ShardingError

RaggedAllToAll = Callable[..., jax.Array]
# An exchange's result: the expert-major rows [R, D], the local group sizes [El], and the return trip.
Dispatched = tuple[jax.Array, jax.Array, Callable[[jax.Array], jax.Array]]


def resolve_exchange(exchange: Exchange | str) -> Exchange:
    """Maps `AUTO` to the exchange the default backend implements."""
    exchange = Exchange(exchange)
    if exchange is not Exchange.AUTO:
        return exchange
    return Exchange.PADDED if jax.default_backend() == "cpu" else Exchange.RAGGED


def permute(x: jax.Array, experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sorts the (token, slot) rows by expert.

    Args:
      x: [X, D] tokens.
      experts: [X, k] chosen experts.
      num_experts: E.

    Returns:
      rows [M, D] sorted by expert, group sizes [E] int32, and `order` [M]
      (the flat (token, slot) index of each sorted row) for `unpermute`.
    """
    k = experts.shape[1]
    flat = experts.reshape(-1)  # [M]
    order = jnp.argsort(flat, stable=True)
    rows = jnp.take(x, order // k, axis=0)  # [M, D]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return rows, group_sizes, order


def unpermute(rows: jax.Array, order: jax.Array, k: int) -> jax.Array:
    """Inverse of `permute`: [M, D] sorted rows -> [X, k, D]."""
    inverse = jnp.argsort(order)
    return jnp.take(rows, inverse, axis=0).reshape(-1, k, rows.shape[-1])


def mesh_is_parallel(mesh: Mesh | AbstractMesh | None) -> bool:
    """True when `mesh` is set and has more than one device (the MoE then uses `expert_parallel_ffn`)."""
    return mesh is not None and not mesh.empty and math.prod(mesh.axis_sizes) > 1


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


def _ragged_dispatch(rows: jax.Array, counts: jax.Array, e: int, R: int, collective: RaggedAllToAll) -> Dispatched:
    """RAGGED exchange of sorted rows [M_l, D] -> expert-major buffer [R, D], local sizes [El], and the return."""
    E = counts.shape[0]
    El = E // e
    me = jax.lax.axis_index("expert")
    C = jax.lax.all_gather(counts, "expert")  # [e, E] rows of each source for each expert
    T = jnp.sum(C, axis=0)  # [E]
    base = _exclusive_cumsum(T.reshape(e, El), 1).reshape(E)  # start of expert g in its owner's buffer
    prefix = _exclusive_cumsum(C, 0)  # [e, E] rows of g from earlier sources
    mine = lambda a: jax.lax.dynamic_slice_in_dim(a, me * El, El, axis=a.ndim - 1)  # noqa: E731
    recv_sizes = mine(C).reshape(E)  # slice s * El + l: rows of my expert l from source s
    out_offsets = base + jnp.take(prefix, me, axis=0)
    recv = collective(rows, jnp.zeros((R, rows.shape[1]), rows.dtype), _exclusive_cumsum(counts, 0), counts,
                      out_offsets, recv_sizes, axis_name="expert")

    def back(out: jax.Array) -> jax.Array:  # [R, D] -> [M_l, D]
        in_offsets = (mine(base)[None] + mine(prefix)).reshape(E)
        src_offsets = mine(_exclusive_cumsum(C, 1)).reshape(E)  # where source s keeps expert g's rows
        return collective(out, jnp.zeros(rows.shape, out.dtype), in_offsets, recv_sizes, src_offsets, counts,
                          axis_name="expert")

    return recv, mine(T), back


def _padded_dispatch(rows: jax.Array, counts: jax.Array, e: int, cap: int) -> Dispatched:
    """PADDED exchange of sorted rows [M_l, D] -> expert-major buffer [e * cap, D], local sizes [El], and the return."""
    M, E = rows.shape[0], counts.shape[0]
    El = E // e
    R = e * cap
    blocks = counts.reshape(e, El)  # rows I send to owner j, per its local expert
    send_sizes = jnp.sum(blocks, axis=1)  # [e]
    send_offsets = _exclusive_cumsum(send_sizes, 0)
    r = jnp.arange(cap)
    idx = jnp.where(r < send_sizes[:, None], send_offsets[:, None] + r, M).reshape(R)  # [e * cap]
    send = jnp.take(rows, idx, axis=0, mode="fill", fill_value=0)  # [e * cap, D]
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # block s: from source s
    C = jax.lax.all_to_all(blocks, "expert", 0, 0, tiled=True)  # [e, El] rows of my expert l from source s
    T = jnp.sum(C, axis=0)  # [El]
    starts = _exclusive_cumsum(T, 0)  # expert-major start of local expert l
    prefix = _exclusive_cumsum(C, 0)  # rows of l from earlier sources
    within = _exclusive_cumsum(C, 1)  # start of l inside source s's block

    # Expert-major position p <- (source s, row r of its block).
    p = jnp.arange(R)
    l = jnp.clip(jnp.searchsorted(jnp.cumsum(T), p, side="right"), 0, El - 1)
    o = p - starts[l]
    s = jnp.sum(jnp.cumsum(C, axis=0)[:, l] <= o[None], axis=0)  # [R]
    s_c = jnp.clip(s, 0, e - 1)
    src = s_c * cap + within[s_c, l] + o - prefix[s_c, l]
    sorted_rows = jnp.take(recv, jnp.where(p < jnp.sum(T), src, R), axis=0, mode="fill", fill_value=0)

    # Inverse: (source s, row r) -> expert-major position.
    rs = jnp.arange(R) % cap
    ss = jnp.arange(R) // cap
    ls = jnp.clip(jnp.sum(jnp.cumsum(C, axis=1)[ss] <= rs[:, None], axis=1), 0, El - 1)  # [R]
    pos = starts[ls] + prefix[ss, ls] + rs - within[ss, ls]
    pos = jnp.where(rs < jnp.sum(C, axis=1)[ss], pos, R)
    dest = jnp.clip(jnp.searchsorted(jnp.cumsum(send_sizes), jnp.arange(M), side="right"), 0, e - 1)
    home = dest * cap + jnp.arange(M) - send_offsets[dest]  # where my sorted row m comes back

    def back(out: jax.Array) -> jax.Array:  # [R, D] -> [M_l, D]
        blocks_out = jnp.take(out, pos, axis=0, mode="fill", fill_value=0)  # [e * cap, D] by source
        returned = jax.lax.all_to_all(blocks_out, "expert", 0, 0, tiled=True)  # block j: from owner j
        return jnp.take(returned, home, axis=0)

    return sorted_rows, T, back


def _local_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array, wg: jax.Array, wu: jax.Array,
               wd: jax.Array, *, sizes: dict[str, int], num_experts: int, impl: GmmImpl, exchange: Exchange,
               collective: RaggedAllToAll) -> jax.Array:
    """One device's part of `expert_parallel_ffn` (inside `shard_map`; `sizes` holds the mesh's axes)."""
    X, k = experts.shape
    e, f = sizes.get("expert", 1), sizes.get("fsdp", 1)
    El = num_experts // e
    if f > 1:  # FSDP: gather the D axis of the local experts.
        wg, wu = (jax.lax.all_gather(w, "fsdp", axis=1, tiled=True) for w in (wg, wu))  # [El, D, F/t]
        wd = jax.lax.all_gather(wd, "fsdp", axis=2, tiled=True)  # [El, F/t, D]
    rows, counts, order = permute(x, experts, num_experts)  # [M_l, D], [E]
    if e == 1:
        recv, local_sizes, back = rows, counts, lambda out: out
    elif exchange is Exchange.RAGGED:
        recv, local_sizes, back = _ragged_dispatch(rows, counts, e, e * X * min(k, El), collective)
    else:
        recv, local_sizes, back = _padded_dispatch(rows, counts, e, X * min(k, El))
    gmm = lambda lhs, w: grouped_matmul(lhs, w, local_sizes, impl=impl)  # noqa: E731
    h = nn.silu(gmm(recv, wg)) * gmm(recv, wu)  # [R, F/t]
    out = unpermute(back(gmm(h, wd)), order, k)  # [X_l, k, D], partial sums over tensor
    y = jnp.sum(out.astype(jnp.float32) * weights[..., None], axis=1)  # [X_l, D]
    if "tensor" in sizes:
        y = jax.lax.psum(y, "tensor")
    return y.astype(x.dtype)


def expert_parallel_ffn(x: jax.Array, weights: jax.Array, experts: jax.Array, wg: jax.Array, wu: jax.Array,
                        wd: jax.Array, *, mesh: Mesh | AbstractMesh | None = None, impl: GmmImpl = GmmImpl.AUTO,
                        exchange: Exchange = Exchange.AUTO, collective: RaggedAllToAll | None = None) -> jax.Array:
    """The routed experts of an MoE layer, expert-parallel over the mesh (see the module docstring).

    Args:
      x: [X, D] tokens.
      weights: [X, k] float32 router weights of the chosen experts.
      experts: [X, k] int32 chosen experts.
      wg, wu: [E, D, F] gate and up projections (in the compute dtype).
      wd: [E, F, D] down projection.
      mesh: the mesh (default: the one set with `jax.set_mesh`); its axes must be among `MESH_AXES`.
      impl: the grouped matmul (`ling_jax.grouped_matmul`).
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
    for what, n, axis in (("num_experts", E, "expert"), ("moe_intermediate_size", F, "tensor"),
                          ("hidden_size", D, "fsdp")):
        if n % sizes.get(axis, 1):
            raise ShardingError(f"{what} ({n}) is not divisible by mesh axis {axis!r} (size {sizes[axis]})")
    present = lambda *names: tuple(a for a in names if a in sizes) or None  # noqa: E731
    tokens = PartitionSpec(present(*DATA_AXES), None)
    pad = -X % math.prod(sizes.get(a, 1) for a in DATA_AXES)  # padded tokens: expert 0, weight 0
    if pad:
        x, weights, experts = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, weights, experts))
    w_in = PartitionSpec(*(present(a) for a in ("expert", "fsdp", "tensor")))
    w_out = PartitionSpec(*(present(a) for a in ("expert", "tensor", "fsdp")))
    body = functools.partial(_local_ffn, sizes=sizes, num_experts=E, impl=impl, exchange=resolve_exchange(exchange),
                             collective=collective or jax.lax.ragged_all_to_all)
    y = jax.shard_map(body, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out), out_specs=tokens,
                      check_vma=False)(x, weights.astype(jnp.float32), experts.astype(jnp.int32), wg, wu, wd)
    return y[:X]
