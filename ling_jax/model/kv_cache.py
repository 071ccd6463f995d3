"""The KV cache of generation as a typed pytree.

Axis letters as in `ling_jax.model`: L layers of a stack, B batch, S cache
slots, K kv heads, H head dim.

`KVCache` holds one `LayerCache` per scanned layer stack (keyed by the stack
name, `ling_jax.config.DENSE_STACK` / `MOE_STACK`) and the slot the next
token is written to. Inside a stack's `nn.scan` each layer sees its own
`LayerCache` slice (`k`, `v` of [B, S, K, H]).

Updated in place: with a cache, the layer scan does not scan over the stack
(that would write a new [L, B, S, K, H] stack per step, and copy it) but
carries the whole stack as a `CacheSlot` (the stack and the layer's index).
A layer writes its new keys and values into the carried stack with one
`dynamic_update_slice` (in place, as the buffer is carried through the
loops and donated by `generate`) and reads blocks of its own slots (`read`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from ling_jax.config import MTP_STACK, LingConfig


@flax.struct.dataclass
class LayerCache:
    """Keys and values of one layer ([B, S, K, H]) or of a whole stack ([L, B, S, K, H])."""

    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, slot: jax.Array | int) -> LayerCache:
        """The cache with `k`, `v` [B, T, K, H] written at slots `slot .. slot + T - 1` (one layer)."""
        return LayerCache(jax.lax.dynamic_update_slice_in_dim(self.k, k.astype(self.k.dtype), slot, 1),
                          jax.lax.dynamic_update_slice_in_dim(self.v, v.astype(self.v.dtype), slot, 1))

    def read(self, start: jax.Array | int, size: int) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, size, K, H] of slots `start .. start + size - 1` (one layer)."""
        return (jax.lax.dynamic_slice_in_dim(self.k, start, size, 1),
                jax.lax.dynamic_slice_in_dim(self.v, start, size, 1))


@flax.struct.dataclass
class CacheSlot:
    """One layer's view of a whole stack's cache [L, B, S, K, H], carried through the layer scan."""

    stack: LayerCache
    layer: jax.Array  # scalar int32

    def write(self, k: jax.Array, v: jax.Array, slot: jax.Array | int) -> CacheSlot:
        """The view with `k`, `v` [B, T, K, H] written at this layer's slots `slot .. slot + T - 1`."""
        def put(stack: jax.Array, new: jax.Array) -> jax.Array:
            start = (self.layer, jnp.int32(0), jnp.asarray(slot, jnp.int32), jnp.int32(0), jnp.int32(0))
            return jax.lax.dynamic_update_slice(stack, new.astype(stack.dtype)[None], start)

        return CacheSlot(LayerCache(put(self.stack.k, k), put(self.stack.v, v)), self.layer)

    def read(self, start: jax.Array | int, size: int) -> tuple[jax.Array, jax.Array]:
        """This layer's keys and values [B, size, K, H] of slots `start .. start + size - 1`, sliced from the
        stack (the layer's whole [B, S, K, H] is never materialised)."""
        def get(stack: jax.Array) -> jax.Array:
            begin = (self.layer, jnp.int32(0), jnp.asarray(start, jnp.int32), jnp.int32(0), jnp.int32(0))
            return jax.lax.dynamic_slice(stack, begin, (1, stack.shape[1], size, *stack.shape[3:]))[0]

        return get(self.stack.k), get(self.stack.v)

    def next_layer(self) -> CacheSlot:
        """The same stack, viewed by the next layer."""
        return CacheSlot(self.stack, self.layer + 1)


@flax.struct.dataclass
class KVCache:
    """Per-stack layer caches and `index`, the next slot to write (a scalar int32)."""

    stacks: dict[str, LayerCache]
    index: jax.Array

    @property
    def max_len(self) -> int:
        """S, the number of slots."""
        return next(iter(self.stacks.values())).k.shape[2]


def init_cache(config: LingConfig, batch_size: int, max_len: int, dtype: Any = jnp.bfloat16, *,
               mtp: bool = False) -> KVCache:
    """An empty cache of `max_len` slots for every layer stack of `config` (and its MTP layers when `mtp`)."""
    def stack(layers: int) -> LayerCache:
        shape = (layers, batch_size, max_len, config.num_key_value_heads, config.head_dim)
        return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    stacks = {name: stack(layers) for name, layers, _ in config.stacks}
    if mtp and config.num_mtp_layers:
        stacks[MTP_STACK] = stack(config.num_mtp_layers)
    return KVCache(stacks, jnp.zeros((), jnp.int32))
