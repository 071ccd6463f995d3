"""Cross-entropy masking, z-loss, load-balance loss and router statistics against hand computations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ling_jax
from ling_jax.train.losses import (
    cross_entropy,
    expert_load,
    load_balance_loss,
    next_token_loss,
    router_stats,
    z_loss,
)

# log-softmax of [0, ln 2, ln 3] is [ln 1/6, ln 2/6, ln 3/6].
ROW = [0.0, math.log(2.0), math.log(3.0)]


def test_cross_entropy_ignores_minus_100():
    logits = jnp.array([[ROW, ROW, [5.0, -3.0, 1.0]]])  # [1, 3, 3]
    labels = jnp.array([[2, 0, -100]])
    total, count = cross_entropy(logits, labels)
    assert float(count) == 2.0
    assert float(total) == pytest.approx(math.log(2.0) + math.log(6.0), rel=1e-6)
    total, count = cross_entropy(logits, jnp.full((1, 3), -100))
    assert float(total) == 0.0 and float(count) == 0.0


def test_next_token_loss_shifts_and_masks():
    logits = jnp.array([[ROW, ROW, ROW, [9.0, 9.0, 9.0]]])  # the last position predicts nothing
    labels = jnp.array([[7, 1, -100, 2]])  # position 0 -> 1, 1 -> ignored, 2 -> 2
    expected = (math.log(3.0) + math.log(2.0)) / 2
    assert float(next_token_loss(logits, labels)) == pytest.approx(expected, rel=1e-6)
    assert float(next_token_loss(logits, jnp.full((1, 4), -100))) == 0.0


def test_z_loss():
    # logsumexp(ROW) = ln 6, logsumexp([0, 0, 0]) = ln 3; the third token is masked out.
    logits = jnp.array([[ROW, [0.0, 0.0, 0.0], [50.0, 0.0, 0.0]]])
    mask = jnp.array([[True, True, False]])
    expected = (math.log(6.0) ** 2 + math.log(3.0) ** 2) / 2
    assert float(z_loss(logits, mask)) == pytest.approx(expected, rel=1e-6)
    lse_last = 50.0 + math.log(1 + 2 * math.exp(-50.0))
    everything = (math.log(6.0) ** 2 + math.log(3.0) ** 2 + lse_last**2) / 3
    assert float(z_loss(logits)) == pytest.approx(everything, rel=1e-6)
    assert float(z_loss(logits, jnp.zeros((1, 3), bool))) == 0.0
    assert z_loss(logits.astype(jnp.bfloat16), mask).dtype == jnp.float32


def test_load_balance_uniform_is_one():
    E, k, tokens = 8, 2, 40
    counts = jnp.full((E,), tokens * k / E)
    probs = jnp.full((E,), 1.0 / E)
    assert float(load_balance_loss(counts, probs, E, k)) == pytest.approx(1.0, rel=1e-6)
    stacked = jnp.stack([counts, counts, counts])  # [L, E]
    assert float(load_balance_loss(stacked, jnp.stack([probs] * 3), E, k)) == pytest.approx(1.0, rel=1e-6)


def test_load_balance_hand_computed_and_layer_mean():
    # 2 tokens, top-2 over 4 experts: counts [3, 1, 0, 0] -> f = [3/4, 1/4, 0, 0].
    counts = jnp.array([3.0, 1.0, 0.0, 0.0])
    probs = jnp.array([0.5, 0.3, 0.1, 0.1])
    skewed = 4 * (0.75 * 0.5 + 0.25 * 0.3)  # 1.8
    assert float(load_balance_loss(counts, probs, 4, 2)) == pytest.approx(skewed, rel=1e-6)
    uniform = (jnp.full((4,), 1.0), jnp.full((4,), 0.25))
    loss = load_balance_loss(jnp.stack([counts, uniform[0]]), jnp.stack([probs, uniform[1]]), 4, 2)
    assert float(loss) == pytest.approx((skewed + 1.0) / 2, rel=1e-6)


def test_load_balance_gradient_flows_through_probs_only():
    counts = jnp.array([3.0, 1.0, 0.0, 0.0])
    probs = jnp.array([0.5, 0.3, 0.1, 0.1])
    g_counts, g_probs = jax.grad(load_balance_loss, argnums=(0, 1))(counts, probs, 4, 2)
    np.testing.assert_array_equal(g_counts, 0.0)
    np.testing.assert_allclose(g_probs, 4 * np.array([0.75, 0.25, 0.0, 0.0]), rtol=1e-6)


@pytest.mark.parametrize("counts, probs, E, k, message", [
    (jnp.ones(4), jnp.ones(5), 4, 2, "same shape"),
    (jnp.ones(4), jnp.ones(4), 8, 2, r"expected \[..., 8\]"),
    (jnp.ones(4), jnp.ones(4), 4, 5, "top_k"),
])
def test_load_balance_errors(counts, probs, E, k, message):
    with pytest.raises(ValueError, match=message):
        load_balance_loss(counts, probs, E, k)


def test_expert_load_fractions():
    np.testing.assert_allclose(expert_load(jnp.array([[3.0, 1.0], [0.0, 0.0]])), [[0.75, 0.25], [0.0, 0.0]])


def test_router_stats_from_the_model():
    cfg = ling_jax.get_config("tiny")
    model = ling_jax.LingForCausalLM(cfg)
    shapes = jax.eval_shape(lambda: ling_jax.init_params(model, jax.random.key(0)))  # no init compile
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
    ids = jax.random.randint(jax.random.key(1), (2, 6), 2, cfg.vocab_size)
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # 10 real tokens
    apply = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, mutable=["intermediates"])[1])
    state = apply(params, ids, mask)
    stats = router_stats(state["intermediates"])
    L, E, k = cfg.num_moe_layers, cfg.num_experts, cfg.num_experts_per_tok
    assert stats["tokens_per_expert"].shape == (L, E) and stats["router_prob_mean"].shape == (L, E)
    assert stats["router_z_loss"].shape == (L,)
    np.testing.assert_allclose(jnp.sum(stats["tokens_per_expert"], -1), 10 * k)  # real tokens only
    np.testing.assert_allclose(jnp.sum(stats["router_prob_mean"], -1), 1.0, rtol=1e-5)
    assert router_stats(state).keys() == stats.keys()  # the whole mutable state works too
    np.testing.assert_allclose(jnp.sum(expert_load(stats["tokens_per_expert"]), -1), 1.0, rtol=1e-6)


def test_router_stats_without_moe_layers():
    assert router_stats({}) == {}
    assert router_stats({"dense_layers": {}}) == {}
    with pytest.raises(ValueError, match="incomplete"):
        router_stats({"moe_layers": {"mlp": {"tokens_per_expert": (jnp.ones((1, 4)),)}}})
