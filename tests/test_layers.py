"""`ling_jax.model.layers`: RMSNorm, RoPE and NormHead numerics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import ling_jax
from ling_jax.model.layers import RMSNorm, apply_rope, project_vocab, rope_frequencies


def test_rmsnorm_normalises_in_float32_then_casts_then_scales():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)) * 100, jnp.bfloat16)
    norm = RMSNorm(1e-5, dtype=jnp.bfloat16)
    scale = jnp.linspace(0.5, 2.0, 8).astype(jnp.float32)
    y = norm.apply({"params": {"scale": scale}}, x)
    x32 = np.asarray(x, np.float32)
    normed = (x32 / np.sqrt((x32**2).mean(-1, keepdims=True) + 1e-5)).astype(jnp.bfloat16)
    expected = np.asarray(scale.astype(jnp.bfloat16)) * normed
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))


def test_rope_is_rotate_half_over_whole_head_dim():
    cfg = ling_jax.get_config("tiny")
    H = cfg.head_dim
    x = jax.random.normal(jax.random.key(0), (1, 3, 1, H))
    pos = jnp.asarray([[0, 5, 17]])
    y = np.asarray(apply_rope(x, pos, rope_frequencies(cfg)))
    inv = 1.0 / 600000.0 ** (np.arange(0, H, 2) / H)
    for t, p in enumerate([0, 5, 17]):
        ang = np.concatenate([p * inv, p * inv])
        xx = np.asarray(x[0, t, 0])
        rot = np.concatenate([-xx[H // 2:], xx[: H // 2]])
        np.testing.assert_allclose(y[0, t, 0], xx * np.cos(ang) + rot * np.sin(ang), atol=1e-5)
    # Relative positions only: shifting both q and k positions keeps their dot product.
    q, k = x[:, :1], x[:, 1:2]
    dot = lambda a, b: float(jnp.sum(apply_rope(q, jnp.asarray([[a]]), rope_frequencies(cfg)) *  # noqa: E731
                                     apply_rope(k, jnp.asarray([[b]]), rope_frequencies(cfg))))
    assert abs(dot(3, 7) - dot(103, 107)) < 1e-4


def test_norm_head_gradient_treats_norm_as_constant():
    kernel = jax.random.normal(jax.random.key(0), (4, 6))
    x = jax.random.normal(jax.random.key(1), (1, 2, 4))
    norm = jnp.linalg.norm(kernel, axis=1, keepdims=True)
    g = jax.grad(lambda k: jnp.sum(project_vocab(x, k, True, False, jnp.float32)))(kernel)
    expected = jnp.einsum("btd,btv->dv", x, jnp.ones((1, 2, 6))) / (norm + 1e-7)
    np.testing.assert_allclose(g, expected, rtol=1e-5)
    eval_logits = project_vocab(x, kernel, True, True, jnp.float32)
    np.testing.assert_allclose(eval_logits, x @ (kernel / norm), rtol=1e-5)
