"""`ling_jax.moe`: routing, permutation and the dropless MoE layer against a per-token reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ling_jax
from ling_jax.model.moe import MoE, permute, route, unpermute


def test_route_renormalises_top_k():
    logits = jnp.log(jnp.asarray([[0.1, 0.6, 0.2, 0.1]]))
    probs, w, e = route(logits, 2, normalize=True)
    np.testing.assert_allclose(probs, [[0.1, 0.6, 0.2, 0.1]], rtol=1e-6)
    np.testing.assert_array_equal(e, [[1, 2]])
    np.testing.assert_allclose(w, [[0.75, 0.25]], rtol=1e-6)
    _, w_raw, _ = route(logits, 2, normalize=False)
    np.testing.assert_allclose(w_raw, [[0.6, 0.2]], rtol=1e-6)
    _, w_one, _ = route(logits, 1, normalize=True)  # k = 1 is never renormalised
    np.testing.assert_allclose(w_one, [[0.6]], rtol=1e-6)


def test_permute_sorts_by_expert_and_unpermute_inverts():
    x = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3)
    experts = jnp.asarray([[2, 0], [1, 2], [0, 3], [2, 1], [3, 0]])
    rows, sizes, order = permute(x, experts, 4)
    np.testing.assert_array_equal(sizes, [3, 2, 3, 2])
    flat = np.asarray(experts).reshape(-1)[np.asarray(order)]
    assert (np.diff(flat) >= 0).all()
    back = unpermute(rows, order, 2)
    np.testing.assert_array_equal(back, np.repeat(np.asarray(x)[:, None], 2, axis=1))


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
