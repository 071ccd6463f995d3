"""Attention kernels of `ling_jax.model.attention` agree with each other and respect the masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.model.attention import (
    attention_mask,
    cached_attention,
    dot_product_attention,
    fold_padding,
    splash_attention,
    xla_attention,
)
from ling_jax.model.kv_cache import CacheSlot, LayerCache


def _qkv(B=2, T=16, N=4, K=2, H=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
            jax.random.normal(ks[2], (B, T, K, H)))


def _numpy_attention(q, k, v, allowed):
    q, k, v = map(np.asarray, (q, k, v))
    H = q.shape[-1]
    N = q.shape[2]
    rep = N // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", p, v)


def _segments():
    seg = np.array([[1] * 6 + [2] * 10, [1] * 16])
    mask = np.array([[1] * 16, [0] * 5 + [1] * 11])
    return jnp.asarray(fold_padding(jnp.asarray(mask), jnp.asarray(seg), seg.shape)), mask


def test_mask_rule_causal_same_segment_no_padding():
    segs, _ = _segments()
    m = np.asarray(attention_mask(jnp.arange(16), segs, segs, jnp.ones((2, 16), bool)))
    assert m[0, 7, 6] and not m[0, 7, 5] and not m[0, 3, 4]  # segment 2 starts at 6; causal
    assert not m[1, 8, 4] and m[1, 8, 5]  # row 1: slots 0-4 are padding


def test_xla_attention_matches_numpy_with_gqa_and_segments():
    q, k, v = _qkv()
    segs, mask = _segments()
    allowed = np.asarray(attention_mask(jnp.arange(16), segs, segs, jnp.ones((2, 16), bool)))
    out = xla_attention(q, k, v, jnp.asarray(allowed))
    ref = _numpy_attention(q, k, v, allowed)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-5)


def test_dot_product_attention_path_matches_xla():
    """The cuDNN path's masking, run through jax.nn.dot_product_attention's XLA implementation."""
    q, k, v = _qkv()
    segs, mask = _segments()
    allowed = attention_mask(jnp.arange(16), segs, segs, jnp.ones((2, 16), bool))
    ref = xla_attention(q, k, v, allowed)
    out = dot_product_attention(q, k, v, segs, implementation="xla")
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)
    plain = dot_product_attention(q, k, v, None, implementation="xla")
    ones = jnp.ones((2, 16), jnp.int32)
    np.testing.assert_allclose(plain, xla_attention(q, k, v, attention_mask(jnp.arange(16), ones, ones,
                                                                            ones.astype(bool))), atol=1e-5)


def test_splash_attention_interpret_matches_xla():
    """JAX's Pallas TPU splash kernel in interpret mode, T padded from 100 to 128."""
    q, k, v = _qkv(B=1, T=100, N=4, K=2, H=128, seed=1)
    seg = jnp.asarray([[1] * 40 + [2] * 60])
    ref = xla_attention(q, k, v, attention_mask(jnp.arange(100), seg, seg, jnp.ones((1, 100), bool)))
    out = splash_attention(q, k, v, seg, interpret=True)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_cached_attention_reads_blocks_and_agrees_with_one_pass():
    """Blocks of 8 over a 21-slot cache (the last block shifted back), T = 1 and a 3-query chunk, a row whose
    padding fills the first block, and garbage past the last query's slot that must not matter."""
    B, S, N, K, H = 2, 21, 4, 2, 16
    ks = jax.random.split(jax.random.key(3), 3)
    k, v = jax.random.normal(ks[0], (B, S, K, H)), jax.random.normal(ks[1], (B, S, K, H))
    valid = jnp.asarray(np.arange(S)[None, :] >= np.array([[0], [10]]))  # row 1: 10 padding slots
    for T, first in ((1, 12), (3, 16), (1, 20)):
        q = jax.random.normal(ks[2], (B, T, N, H))
        slots = first + jnp.arange(T)
        one_pass = xla_attention(q, k, v, attention_mask(slots, jnp.ones((B, T)), jnp.ones((B, S)), valid))
        junk = jnp.arange(S)[None, :, None, None] > slots[-1]
        cache = LayerCache(jnp.where(junk, 1e4, k), jnp.where(junk, -1e4, v))
        got = cached_attention(q, cache, slots, valid, block=8)
        np.testing.assert_allclose(got, one_pass, rtol=1e-5, atol=1e-5)
        stack = LayerCache(jnp.stack([cache.k * 0, cache.k]), jnp.stack([cache.v * 0, cache.v]))
        np.testing.assert_allclose(cached_attention(q, CacheSlot(stack, jnp.int32(1)), slots, valid, block=8),
                                   got, rtol=1e-6, atol=1e-6)
        assert np.asarray(cached_attention(q, cache, slots, valid, block=S)).shape == (B, T, N, H)
