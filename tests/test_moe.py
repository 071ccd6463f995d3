"""`ling_jax.model.moe`: the dropless MoE layer against a per-token float64 reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ling_jax
from ling_jax.model.moe import MoE


def _reference_moe(params, x, cfg):
    """Per-token loop in NumPy float64: softmax, top-k, renormalise, experts, shared experts."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    out = np.zeros_like(x)
    for i, tok in enumerate(x):
        logits = tok @ p["router"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[: cfg.num_experts_per_tok]
        w = probs[top] / probs[top].sum()
        for e, we in zip(top, w, strict=True):
            h = silu(tok @ p["gate_proj"][e]) * (tok @ p["up_proj"][e])
            out[i] += we * (h @ p["down_proj"][e])
        s = p["shared_experts"]
        out[i] += (silu(tok @ s["gate_proj"]) * (tok @ s["up_proj"])) @ s["down_proj"]
    return out


@pytest.mark.parametrize("impl", [ling_jax.GmmImpl.XLA, ling_jax.GmmImpl.REFERENCE, ling_jax.GmmImpl.RAGGED_DOT])
def test_moe_layer_matches_per_token_reference(impl):
    cfg = ling_jax.get_config("tiny", gmm_impl=impl)
    layer = MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (2, 11, cfg.hidden_size))
    params = layer.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda a: a * 5, nn.unbox(params))  # sharper routing
    y = layer.apply({"params": params}, x)
    ref = _reference_moe(params, np.asarray(x, np.float64).reshape(-1, cfg.hidden_size), cfg)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, cfg.hidden_size), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # 27 s: every impl differentiated
def test_moe_gradients_agree_across_impls():
    cfg = ling_jax.get_config("tiny")
    x = jax.random.normal(jax.random.key(0), (2, 7, cfg.hidden_size))
    params = nn.unbox(MoE(cfg).init(jax.random.key(2), x)["params"])

    def grads(impl):
        layer = MoE(cfg.replace(gmm_impl=impl))
        return jax.grad(lambda p, x: jnp.sum(layer.apply({"params": p}, x) ** 2), argnums=(0, 1))(params, x)

    ref = grads(ling_jax.GmmImpl.REFERENCE)
    for a, b in zip(jax.tree.leaves(grads(ling_jax.GmmImpl.XLA)), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
