"""The decode step compiled ahead of time for a mesh, and the compiler's memory per device.

`compile_decode_step` compiles `ling_jax.inference.decoding.decode_step` (one
token per row through the model with a KV cache of `max_len` slots) with the
parameters sharded by the logical-axis rules, the cache's batch split over the
data axes and its kv heads over `tensor` (where they divide), and the cache
donated, as generation runs it.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ling_jax.inference.decoding import decode_step
from ling_jax.model.aot import CompiledProgram, MemoryUse, compile_abstract
from ling_jax.model.kv_cache import KVCache, init_cache
from ling_jax.model.params import abstract_params, logical_axes
from ling_jax.model.sharding import DATA_AXES, TENSOR_AXIS, axes_dividing, logical_shardings, use_mesh
from ling_jax.model.sharding import abstract_with_shardings as abstract_with
from ling_jax.model.transformer import LingForCausalLM


def compile_decode_step(model: LingForCausalLM, mesh: Mesh, *, batch_size: int, max_len: int,
                        cache_dtype: Any = None) -> CompiledProgram:
    """Compiles one decode step of `batch_size` rows against a cache of `max_len` slots for `mesh`."""
    cache_dtype = model.dtype if cache_dtype is None else cache_dtype
    B, S = batch_size, max_len
    start = time.perf_counter()
    params, specs = abstract_params(model.config, model.param_dtype), logical_axes(model)  # outside the mesh
    cache = jax.eval_shape(lambda: init_cache(model.config, B, S, cache_dtype))
    with use_mesh(mesh):
        param_sh = logical_shardings(specs, mesh)
        rows = axes_dividing(mesh, DATA_AXES, B)
        heads = axes_dividing(mesh, (TENSOR_AXIS,), model.config.num_key_value_heads)
        kv = NamedSharding(mesh, PartitionSpec(None, rows, None, heads, None))  # [L, B, S, K, H]
        cache_sh = KVCache({name: jax.tree.map(lambda _: kv, c) for name, c in cache.stacks.items()},
                           NamedSharding(mesh, PartitionSpec()))
        row = lambda *shape: NamedSharding(mesh, PartitionSpec(rows, *(None,) * (len(shape) - 1)))  # noqa: E731
        args = (abstract_with(params, param_sh), abstract_with(cache, cache_sh),
                jax.ShapeDtypeStruct((B,), jnp.int32, sharding=row(B)),
                jax.ShapeDtypeStruct((B, S), jnp.bool_, sharding=row(B, S)),
                jax.ShapeDtypeStruct((B,), jnp.int32, sharding=row(B)))
        compiled = compile_abstract(functools.partial(decode_step, model), *args, donate_argnums=1,
                                    out_shardings=(row(B, 1), cache_sh))  # the cache comes back where it was
    return CompiledProgram("decode_step", MemoryUse.of(compiled), time.perf_counter() - start)
