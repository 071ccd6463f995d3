"""Building blocks shared by the Ling model: RMSNorm, SwiGLU MLP, RoPE, embeddings, NormHead.

Axis letters as in `ling_jax.model`. Every parameter carries logical axis
names (`nn.with_logical_partitioning`); `ling_jax.model.sharding` maps them
onto a device mesh. Activations are annotated with
`nn.with_logical_constraint`, which takes effect only under a mesh and
logical rules (`ling_jax.model.sharding.use_mesh`) and is a no-op otherwise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import LingConfig

Dtype = Any
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)  # `initializer_range` of the reference


def param_with_axes(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
                    dtype: Dtype, init=DEFAULT_INIT) -> jax.Array:
    """Declares a parameter with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """RMSNorm as in the reference: normalise in float32, cast back, then scale."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", (x.shape[-1],), ("norm",), self.param_dtype,
                                nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


class MLP(nn.Module):
    """SwiGLU MLP without biases: down(silu(gate(x)) * up(x))."""

    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        D, F = x.shape[-1], self.intermediate_size
        wg = param_with_axes(self, "gate_proj", (D, F), ("embed", "mlp"), self.param_dtype)
        wu = param_with_axes(self, "up_proj", (D, F), ("embed", "mlp"), self.param_dtype)
        wd = param_with_axes(self, "down_proj", (F, D), ("mlp", "embed"), self.param_dtype)
        x = x.astype(self.dtype)
        h = nn.silu(x @ wg.astype(self.dtype)) * (x @ wu.astype(self.dtype))  # [B, T, F]
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "mlp"))
        return h @ wd.astype(self.dtype)  # [B, T, D]


class Embed(nn.Module):
    """Token embedding `[V, D]` (no scaling); `attend` is the tied output projection.

    `padding_idx`: as torch's `nn.Embedding(padding_idx=...)`, lookups of that
    row pass no gradient to it (the tied output projection still does).
    """

    vocab_size: int
    features: int
    norm_head: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    padding_idx: int | None = None

    def setup(self):
        self.embedding = param_with_axes(self, "embedding", (self.vocab_size, self.features),
                                         ("vocab", "embed"), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:  # [..., T] -> [..., T, D]
        if hasattr(self.embedding, "take_rows"):  # an int8 table (`ling_jax.model.quantization.QArray`)
            x = self.embedding.take_rows(ids, self.dtype)
        else:
            x = jnp.take(self.embedding, ids, axis=0)
        if self.padding_idx is not None:
            x = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(x), x)
        return x.astype(self.dtype)

    def attend(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        """Tied-embedding logits [B, T, V] (float32)."""
        return project_vocab(x, self.embedding.T, self.norm_head, deterministic, self.dtype)


def project_vocab(x: jax.Array, kernel: jax.Array, norm_head: bool, deterministic: bool,
                  dtype: Dtype) -> jax.Array:
    """Float32 logits `x @ kernel` ([B, T, D] x [D, V]), with the reference's NormHead.

    With `norm_head`, the weight is divided by its L2 norm over the vocab axis
    (one norm per hidden unit). In training that norm is a constant plus 1e-7,
    as in the reference; in eval it is `F.normalize` (norm clamped at 1e-12).
    """
    if norm_head:
        k32 = kernel.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(k32 * k32, axis=1, keepdims=True))  # [D, 1]
        if deterministic:
            kernel = k32 / jnp.maximum(norm, 1e-12)
        else:
            kernel = kernel / (jax.lax.stop_gradient(norm) + 1e-7).astype(kernel.dtype)
    return (x.astype(dtype) @ kernel.astype(dtype)).astype(jnp.float32)  # [B, T, V]


class LMHead(nn.Module):
    """Untied output projection `[D, V]` (see `project_vocab`)."""

    vocab_size: int
    norm_head: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kernel = param_with_axes(self, "kernel", (x.shape[-1], self.vocab_size),
                                 ("embed", "vocab"), self.param_dtype)
        return project_vocab(x, kernel, self.norm_head, deterministic, self.dtype)


def rope_frequencies(config: LingConfig) -> jax.Array:
    """Inverse frequencies `[R // 2]` (float32) of the rotary width R (`config.rotary_dim`), linear scaling applied."""
    H = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    scaling = config.rope_scaling_dict
    if scaling is not None:
        inv_freq = inv_freq / float(scaling["factor"])
    return inv_freq


def apply_rope(x: jax.Array, position_ids: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half (NeoX) RoPE over the first R = 2 * len(inv_freq) dims of each head (all of it in v1).

    Partial rotary (Ling 2.0, R < H): the last H - R dims pass through unchanged.

    Args:
      x: [B, T, N, H] queries or keys.
      position_ids: [B, T] integer positions.
      inv_freq: [R // 2] from `rope_frequencies`.

    Returns:
      [B, T, N, H] in `x.dtype`; cos and sin are cast to `x.dtype` first, as in the reference.
    """
    R = 2 * inv_freq.shape[0]
    if x.shape[-1] > R:
        return jnp.concatenate([apply_rope(x[..., :R], position_ids, inv_freq), x[..., R:]], axis=-1)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
