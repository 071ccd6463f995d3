"""`ling_jax.model.kv_cache`: the typed KV cache pytree, its writes, and how the model fills it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ling_jax
from ling_jax.config import DENSE_STACK, MOE_STACK
from ling_jax.model.kv_cache import KVCache, LayerCache, init_cache


@pytest.fixture(scope="module")
def cfg():
    return ling_jax.get_config("tiny")  # 1 dense layer, 2 MoE layers, 2 kv heads of 16


def test_init_gives_one_zero_stack_per_layer_stack(cfg):
    cache = init_cache(cfg, batch_size=3, max_len=10, dtype=jnp.float32)
    assert set(cache.stacks) == {DENSE_STACK, MOE_STACK}
    assert cache.stacks[DENSE_STACK].k.shape == (1, 3, 10, 2, 16)
    assert cache.stacks[MOE_STACK].v.shape == (2, 3, 10, 2, 16)
    assert cache.max_len == 10
    assert cache.index.dtype == jnp.int32 and int(cache.index) == 0
    for layer in cache.stacks.values():
        assert layer.k.dtype == layer.v.dtype == jnp.float32
        assert not np.any(np.asarray(layer.k)) and not np.any(np.asarray(layer.v))
    bf16 = init_cache(cfg, 1, 4)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16.stacks)} == {jnp.dtype(jnp.bfloat16)}  # the default
    dense_only = init_cache(cfg.replace(first_k_dense_replace=3), 1, 4)
    assert set(dense_only.stacks) == {DENSE_STACK} and dense_only.stacks[DENSE_STACK].k.shape[0] == 3


def test_write_puts_keys_and_values_at_the_slot_in_the_cache_dtype():
    layer = LayerCache(jnp.zeros((2, 8, 1, 4), jnp.bfloat16), jnp.zeros((2, 8, 1, 4), jnp.bfloat16))
    k = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 1, 4) + 1
    new = layer.write(k, -k, jnp.int32(5))
    assert isinstance(new, LayerCache) and new.k.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new.k[:, 5:8], np.float32), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(new.v[:, 5:8], np.float32), -np.asarray(k))
    assert not np.any(np.asarray(new.k[:, :5], np.float32))
    assert not np.any(np.asarray(layer.k, np.float32))  # the original is unchanged


def test_cache_is_a_pytree_that_jit_and_scan_carry(cfg):
    cache = init_cache(cfg, 2, 6, jnp.float32)
    assert len(jax.tree.leaves(cache)) == 2 * 2 + 1  # k and v of two stacks, and the index
    doubled = jax.tree.map(lambda a: a + 1, cache)
    assert isinstance(doubled, KVCache) and isinstance(doubled.stacks[MOE_STACK], LayerCache)

    def write_layers(stack: LayerCache, kv: jax.Array, slot: jax.Array) -> LayerCache:
        return jax.vmap(lambda layer: layer.write(kv, kv, slot))(stack)  # every layer of the stack

    def step(c: KVCache, t: jax.Array) -> tuple[KVCache, None]:
        kv = jnp.full((2, 1, 2, 16), t, jnp.float32)  # [B, T=1, K, H]
        stacks = {name: write_layers(stack, kv, c.index) for name, stack in c.stacks.items()}
        return KVCache(stacks, c.index + 1), None

    out, _ = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(1.0, 5.0)))(cache)
    assert isinstance(out, KVCache) and int(out.index) == 4
    np.testing.assert_array_equal(np.asarray(out.stacks[DENSE_STACK].k[0, 0, :, 0, 0]), [1, 2, 3, 4, 0, 0])


@pytest.mark.slow  # 35 s
def test_prefill_then_decode_fills_the_slots_and_advances_the_index(cfg):
    model = ling_jax.LingForCausalLM(cfg)
    params = ling_jax.init_params(model, jax.random.key(0))
    ids = jnp.asarray([[5, 9, 11, 3, 7]])
    cache = init_cache(cfg, 1, 8, jnp.float32)
    _, cache = model.apply({"params": params}, ids, cache=cache, mode=ling_jax.ModelMode.PREFILL)
    assert int(cache.index) == 5
    written = lambda c: np.any(np.asarray(c.stacks[MOE_STACK].k) != 0, axis=(0, 1, 3, 4))  # noqa: E731  [S]
    np.testing.assert_array_equal(written(cache), [True] * 5 + [False] * 3)
    _, cache = model.apply({"params": params}, jnp.asarray([[2]]), cache=cache)  # DECODE by default
    assert int(cache.index) == 6
    np.testing.assert_array_equal(written(cache), [True] * 6 + [False] * 2)
    # The decoded token's keys are the ones a full forward over all six tokens computes.
    full = init_cache(cfg, 1, 8, jnp.float32)
    _, full = model.apply({"params": params}, jnp.asarray([[5, 9, 11, 3, 7, 2]]), cache=full,
                          mode=ling_jax.ModelMode.PREFILL)
    for name in cache.stacks:
        np.testing.assert_allclose(cache.stacks[name].k[:, :, :6], full.stacks[name].k[:, :, :6], atol=1e-5)
        np.testing.assert_allclose(cache.stacks[name].v[:, :, :6], full.stacks[name].v[:, :, :6], atol=1e-5)
