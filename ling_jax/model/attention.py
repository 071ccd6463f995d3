"""Grouped-query attention with RoPE, padding and packed-sequence masks, and a KV cache.

Axis letters as in `ling_jax.model`. Three interchangeable kernels
(`AttentionImpl`), chosen per backend by `AUTO`:

* XLA: einsum + masked float32 softmax (CPU, tests).
* CUDNN: `jax.nn.dot_product_attention(implementation="cudnn")`, flash
  attention on NVIDIA GPUs (bf16/fp16 only; f32 falls back to XLA).
* SPLASH: JAX's Pallas splash attention for TPU (memory linear in T).

Masking rule, the same for all kernels: query t may attend key s iff s <= t
(causal), both lie in the same packed segment, and key s is not padding.
Padding queries produce finite garbage that callers ignore.

With a KV cache (`ModelMode.DECODE`: decode steps and the later chunks of a
chunked prefill) `cached_attention` reads only the filled part of the cache:
slots up to the last query's, in blocks of `CACHE_BLOCK` with an online
(flash-decoding) softmax, so a step early in a long request does not read the
slots that later tokens will fill. A cache of at most one block is attended
in one pass, as `xla_attention`.
"""

from __future__ import annotations

import enum
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ling_jax.config import AttentionImpl, LingConfig
from ling_jax.model.kv_cache import CacheSlot, LayerCache
from ling_jax.model.layers import Dtype, RMSNorm, apply_rope, param_with_axes, rope_frequencies
from ling_jax.model.sharding import DATA_AXES, TENSOR_AXIS, axes_dividing, mesh_is_parallel
from pallas_kernels.common import target_platform


class ModelMode(enum.Enum):
    """How a call uses the KV cache."""

    FORWARD = "forward"  # No cache: a full causal forward (training, scoring).
    PREFILL = "prefill"  # Empty cache: attend within the chunk, write the cache from slot 0.
    DECODE = "decode"  # Append at `cache.index` and attend over the filled part of the cache.


def resolve_attention_impl(impl: AttentionImpl, dtype: Dtype) -> AttentionImpl:
    """Maps `AUTO` to the kernel for the target platform (the mesh's devices) and dtype."""
    if impl is not AttentionImpl.AUTO:
        return impl
    backend = target_platform()
    if backend == "tpu":
        return AttentionImpl.SPLASH
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return AttentionImpl.CUDNN
    return AttentionImpl.XLA


def attention_mask(q_slots: jax.Array, q_segments: jax.Array, kv_segments: jax.Array,
                   kv_valid: jax.Array) -> jax.Array:
    """Boolean mask [B, T, S] of the rule in the module docstring.

    Args:
      q_slots: [T] absolute key slot of each query (its own position in the cache).
      q_segments: [B, T] packed-segment id of each query.
      kv_segments: [B, S] segment id of each key.
      kv_valid: [B, S] True for keys that exist (written and not padding).
    """
    S = kv_segments.shape[1]
    causal = jnp.arange(S)[None, :] <= q_slots[:, None]  # [T, S]
    same = q_segments[:, :, None] == kv_segments[:, None, :]  # [B, T, S]
    return causal[None] & same & kv_valid[:, None, :]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference attention: scores in the compute dtype, softmax in float32.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, T, S] bool.

    Returns:
      [B, T, N, H].
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k) / jnp.asarray(math.sqrt(H), q.dtype)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)
    return out.reshape(B, T, N, H)


CACHE_BLOCK = 512  # cache slots per block of `cached_attention`


def cached_attention(q: jax.Array, cache: LayerCache | CacheSlot, q_slots: jax.Array, kv_valid: jax.Array,
                     block: int | None = None) -> jax.Array:
    """Attention of queries at cache slots `q_slots` over the filled cache slots only (module docstring).

    Blocks `b = 0 .. ceil((q_slots[-1] + 1) / block) - 1` of keys are read (a
    loop with a traced trip count; the last block is shifted back to end at S
    and skips the slots an earlier block covered), each folded into a running
    float32 maximum, normaliser and output. Keys the rule of the module
    docstring excludes get weight exactly 0, so slots past the last query's
    never matter.

    Args:
      q: [B, T, N, H] queries.
      cache: this layer's cache (already holding the queries' own keys), read a block at a time
        (`read`), never copied whole.
      q_slots: [T] int32 cache slot of each query (ascending).
      kv_valid: [B, S] True for slots that hold a real token.
      block: slots per block (default `CACHE_BLOCK`); a cache of at most this many is attended in one pass.

    Returns:
      [B, T, N, H].
    """
    block = CACHE_BLOCK if block is None else block
    B, T, N, H = q.shape
    S, K = kv_valid.shape[1], (cache.stack if isinstance(cache, CacheSlot) else cache).k.shape[-2]
    if block >= S:
        mask = attention_mask(q_slots, jnp.ones((B, T), jnp.int32), jnp.ones((B, S), jnp.int32), kv_valid)
        k, v = cache.read(0, S)
        return xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
    G = N // K
    qg = q.reshape(B, T, K, G, H) / jnp.asarray(math.sqrt(H), q.dtype)  # [B, T, K, G, H]
    neg = jnp.finfo(jnp.float32).min

    def fold(b, carry):
        m, l, acc = carry  # [B, K, G, T], [B, K, G, T], [B, K, G, T, H] float32
        start = jnp.minimum(b * block, S - block)
        kb, vb = (a.astype(q.dtype) for a in cache.read(start, block))  # [B, C, K, H]
        slots = start + jnp.arange(block)  # [C]
        ok = ((slots[None, :] <= q_slots[:, None]) & (slots >= b * block)[None, :])[None] & (
            jax.lax.dynamic_slice_in_dim(kv_valid, start, block, 1)[:, None, :])  # [B, T, C]
        ok = ok[:, None, None]  # [B, 1, 1, T, C]
        scores = jnp.where(ok, jnp.einsum("BTKGH,BCKH->BKGTC", qg, kb).astype(jnp.float32), neg)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        p = jnp.where(ok, jnp.exp(scores - m_new[..., None]), 0.0)  # [B, K, G, T, C]
        scale = jnp.exp(m - m_new)
        pv = jnp.einsum("BKGTC,BCKH->BKGTH", p.astype(q.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l * scale + jnp.sum(p, axis=-1), acc * scale[..., None] + pv

    init = (jnp.full((B, K, G, T), neg), jnp.zeros((B, K, G, T)), jnp.zeros((B, K, G, T, H)))
    blocks = (q_slots[-1] + block) // block  # ceil((last slot + 1) / block)
    _, l, acc = jax.lax.fori_loop(0, blocks, fold, init)
    out = acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[..., None]  # a query with no key gives 0, not NaN
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                          implementation: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` (cuDNN flash on GPU) for a full causal forward.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H].
      segments: [B, T] segment ids (padding has its own id), or None for one
        unpadded sequence per row (then no [T, T] mask is materialised).
      implementation: "cudnn" on GPU; "xla" lets tests check this path on CPU.
    """
    mask = None
    if segments is not None:
        mask = (segments[:, :, None] == segments[:, None, :])[:, None]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                        implementation=implementation)


def _splash_kernel(num_q_per_kv: int, T: int, interpret: bool):
    """The splash kernel for causal attention over T slots, built anew for every trace.

    Not memoised: the kernel holds its mask metadata as arrays, and arrays made
    inside one trace (a `jit`, `nn.scan`, `grad`) must not be reused by the next
    (that was an `UnexpectedTracerError` on the second trace). Building it costs
    a few milliseconds of host work per trace, nothing per step.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    block = next(b for b in (512, 256, 128) if T % b == 0)
    mask = masks.MultiHeadMask([masks.CausalMask((T, T))] * num_q_per_kv)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array,
                     interpret: bool = False) -> jax.Array:
    """Pallas TPU splash attention; T is padded to a multiple of 128.

    Args:
      q: [B, T, N, H]; k, v: [B, T, K, H]; segments: [B, T] int segment ids.
      interpret: run the Pallas kernel in interpret mode (CPU tests).
    """
    B, T, N, H = q.shape
    K = k.shape[2]
    pad = -T % 128
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, pad)), constant_values=-1)
    Tp = T + pad
    kernel = _splash_kernel(N // K, Tp, interpret)
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds,
    )

    q = (q / jnp.asarray(math.sqrt(H), q.dtype)).reshape(B, Tp, K, N // K, H)
    q = q.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]
    seg = segments.astype(jnp.int32)

    def one(qb, kb, vb, sb):  # [G, T, H], [T, H], [T, H], [T]
        return kernel(qb, kb, vb, segment_ids=SegmentIds(q=sb, kv=sb))

    per_kv = jax.vmap(one, in_axes=(0, 0, 0, None))  # over K
    out = jax.vmap(per_kv)(q, k, v, seg)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, H)[:, :T]


class Attention(nn.Module):
    """Ling attention: fused-QKV weights stored as separate q/k/v kernels, RoPE, GQA.

    Ling 2.0 adds `use_qk_norm` (RMSNorm per head on q and k) and partial rotary (`partial_rotary_factor`).
    """

    config: LingConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, D]
        position_ids: jax.Array,  # [B, T]
        segments: jax.Array,  # [B, T] segment ids, padding already folded in
        cache: LayerCache | None = None,
        cache_index: jax.Array | None = None,
        kv_valid: jax.Array | None = None,  # [B, S] with a cache
        mode: ModelMode = ModelMode.FORWARD,
    ) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.config
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        pd, dt = self.param_dtype, self.dtype
        wq = param_with_axes(self, "q_proj", (D, N, H), ("embed", "q_heads", "head_dim"), pd)
        wk = param_with_axes(self, "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        wv = param_with_axes(self, "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
        wo = param_with_axes(self, "o_proj", (N, H, D), ("q_heads", "head_dim", "embed"), pd)
        x = x.astype(dt)
        q = jnp.einsum("BTD,DNH->BTNH", x, wq.astype(dt))
        k = jnp.einsum("BTD,DKH->BTKH", x, wk.astype(dt))
        v = jnp.einsum("BTD,DKH->BTKH", x, wv.astype(dt))
        if cfg.use_qkv_bias:
            zeros = nn.initializers.zeros
            q = q + param_with_axes(self, "q_bias", (N, H), ("q_heads", "head_dim"), pd, zeros).astype(dt)
            k = k + param_with_axes(self, "k_bias", (K, H), ("kv_heads", "head_dim"), pd, zeros).astype(dt)
            v = v + param_with_axes(self, "v_bias", (K, H), ("kv_heads", "head_dim"), pd, zeros).astype(dt)
        if cfg.use_qk_norm:  # Ling 2.0: RMSNorm over each head's dims, before RoPE
            q = RMSNorm(cfg.rms_norm_eps, dt, pd, name="query_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, dt, pd, name="key_norm")(k)
        inv_freq = rope_frequencies(cfg)
        q = apply_rope(q, position_ids, inv_freq)
        k = apply_rope(k, position_ids, inv_freq)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"))

        new_cache = None
        if mode is ModelMode.DECODE:
            new_cache = cache.write(k, v, cache_index)
            out = cached_attention(q, new_cache, cache_index + jnp.arange(x.shape[1]), kv_valid)
        else:
            if mode is ModelMode.PREFILL:
                new_cache = cache.write(k, v, 0)
            out = self._full_attention(q, k, v, segments)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", "head_dim"))
        y = jnp.einsum("BTNH,NHD->BTD", out, wo.astype(dt))
        if cfg.use_bias:
            y = y + param_with_axes(self, "o_bias", (D,), ("embed",), pd, nn.initializers.zeros).astype(dt)
        return y, new_cache

    def _full_attention(self, q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
        impl = resolve_attention_impl(self.config.attention_impl, self.dtype)
        if impl is AttentionImpl.CUDNN:
            return dot_product_attention(q, k, v, segments)
        if impl is AttentionImpl.SPLASH:
            return _sharded_splash(q, k, v, segments)
        T = q.shape[1]
        mask = attention_mask(jnp.arange(T), segments, segments, jnp.ones(segments.shape, bool))
        return xla_attention(q, k, v, mask)


def _sharded_splash(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array) -> jax.Array:
    """`splash_attention` on every device's share: batch over the data axes, heads over `tensor`.

    A Mosaic kernel cannot be partitioned by XLA, so under a mesh of several
    devices it runs inside `jax.shard_map` (each device attends its own rows
    and heads; the GQA grouping survives because N and K split into the same
    number of contiguous blocks). A dimension the mesh does not divide (the
    one-row batch of `init`) is replicated instead of split.
    """
    interpret = target_platform() == "cpu"
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh_is_parallel(mesh):
        return splash_attention(q, k, v, segments, interpret=interpret)
    batch = axes_dividing(mesh, DATA_AXES, q.shape[0])
    heads = axes_dividing(mesh, (TENSOR_AXIS,), math.gcd(q.shape[2], k.shape[2]))  # N and K in as many blocks
    qkv = PartitionSpec(batch, None, heads, None)  # [B, T, N or K, H]
    body = functools.partial(splash_attention, interpret=interpret)
    return jax.shard_map(body, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(batch, None)), out_specs=qkv,
                         check_vma=False)(q, k, v, segments)


def fold_padding(attention_mask: jax.Array | None, segment_ids: jax.Array | None,
                 shape: tuple[int, int]) -> jax.Array:
    """One segment-id array [B, T] that also encodes padding (pad tokens get id -1).

    Real tokens then never attend padding or another document; pad tokens only
    attend pad tokens, so no softmax row is empty.
    """
    seg = jnp.ones(shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    if attention_mask is not None:
        seg = jnp.where(attention_mask.astype(bool), seg, -1)
    return seg
