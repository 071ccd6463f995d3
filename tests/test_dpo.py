"""DPO: the loss against hand computations, the step, a learnable preference task and bad input.

The pair data (ling_jax.data.dpo) is tested in tests/test_dpo_data.py."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ling_jax
from ling_jax.train.dpo import DpoConfig, dpo_loss, dpo_step, sequence_logps
from ling_jax.train.step import init_train_state

# Two pairs: summed response log-probabilities under the policy and the reference.
PC, PR = jnp.array([-3.0, -5.0]), jnp.array([-4.0, -4.5])
RC, RR = jnp.array([-3.5, -4.0]), jnp.array([-3.8, -5.0])


def test_dpo_loss_matches_hand_computation():
    # logits = (pc - pr) - (rc - rr) = [1.0 - 0.3, -0.5 - 1.0] = [0.7, -1.5]; beta * logits = [0.07, -0.15]
    # loss = -log sigmoid(beta * logits) = log(1 + exp(-0.07)), log(1 + exp(0.15)) = 0.658760, 0.770957
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    np.testing.assert_allclose(losses, [0.6587596, 0.7709570], rtol=1e-6)
    np.testing.assert_allclose(chosen, [0.05, -0.1], atol=1e-7)  # 0.1 * (pc - rc)
    np.testing.assert_allclose(rejected, [-0.02, 0.05], atol=1e-7)  # 0.1 * (pr - rr)
    assert float(jnp.mean(losses)) == pytest.approx(0.7148583, rel=1e-6)
    assert float(jnp.mean(chosen > rejected)) == 0.5 and float(jnp.mean(chosen - rejected)) == pytest.approx(-0.04)
    # Conservative DPO, eps = 0.2: 0.8 * log(1 + e^-z) + 0.2 * log(1 + e^z)
    smoothed, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.2)
    np.testing.assert_allclose(smoothed, [0.6727596, 0.7409570], rtol=1e-6)
    # Gradient w.r.t. the policy chosen log-prob: -beta * sigmoid(-beta * logits) / ... per pair.
    g = jax.grad(lambda pc: jnp.sum(dpo_loss(pc, PR, RC, RR, beta=0.1)[0]))(PC)
    np.testing.assert_allclose(g, [-0.1 / (1 + math.exp(0.07)), -0.1 / (1 + math.exp(-0.15))], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    """A random tiny MoE (the dense reference grouped matmul compiles fastest) and one jitted DPO step."""
    config = ling_jax.get_config("tiny", vocab_size=64, max_position_embeddings=64, gmm_impl="reference")
    model = ling_jax.LingForCausalLM(config)
    params = jax.jit(functools.partial(ling_jax.init_params, model))(jax.random.key(2))
    opt = optax.adam(2e-3)
    step = jax.jit(functools.partial(dpo_step, model=model, optimizer=opt,
                                     dpo_cfg=DpoConfig(beta=0.1, accumulation_steps=2)))
    return model, params, opt, step


def _pairs(rng: np.random.Generator, B: int, T: int = 16, eot: int = 2) -> dict[str, np.ndarray]:
    """Prompt: 6 random tokens; chosen: 4 even tokens + eot; rejected: 4 odd tokens + eot (padded to T)."""
    batch = {}
    prompts = rng.integers(8, 64, (B, 6))
    for side, parity in (("chosen", 0), ("rejected", 1)):
        response = rng.integers(4, 32, (B, 4)) * 2 + parity
        ids = np.concatenate([prompts, response, np.full((B, 1), eot)], axis=1)  # [B, 11]
        n = ids.shape[1]
        inputs = np.zeros((B, T), np.int32)
        inputs[:, :n] = ids
        targets = np.full((B, T), -100, np.int32)
        targets[:, 5 : n - 1] = ids[:, 6:]  # the response tokens and eot
        seg = (np.arange(T) < n).astype(np.int32)[None].repeat(B, 0)
        batch.update({f"{side}_inputs": inputs, f"{side}_targets": targets, f"{side}_segment_ids": seg,
                      f"{side}_positions": np.where(seg > 0, np.arange(T), 0).astype(np.int32)})
    return batch


def test_sequence_logps_sum_the_response_tokens(tiny):
    model, params, _, _ = tiny
    batch = _pairs(np.random.default_rng(0), 2)
    rows = {k: jnp.asarray(batch[f"chosen_{k}"]) for k in ("inputs", "targets", "segment_ids", "positions")}
    got, logits = jax.jit(lambda p, r: (
        sequence_logps(model, p, r, deterministic=True),
        model.apply({"params": p}, r["inputs"], r["segment_ids"] > 0, r["positions"], r["segment_ids"])))(params, rows)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    want = [sum(logp[b, t, batch["chosen_targets"][b, t]] for t in range(5, 10)) for b in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_identical_policy_and_reference_give_log2_and_zero_margins(tiny):
    _, params, opt, step = tiny
    batch = jax.tree.map(jnp.asarray, _pairs(np.random.default_rng(1), 16))
    _, m = step(init_train_state(params, opt), params, batch)
    assert float(m["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):  # accuracy of exact ties is noise
        assert float(m[key]) == pytest.approx(0.0, abs=1e-6), key
    assert float(m["grad_norm"]) > 0 and float(m["logps/chosen"]) < 0


def test_dpo_learns_a_synthetic_preference(tiny):
    """Chosen responses use even tokens, rejected odd ones: a few dozen steps separate them on fresh pairs."""
    _, ref, opt, step = tiny
    state = init_train_state(ref, opt)
    rng = np.random.default_rng(2)
    history = []
    for _ in range(30):  # each batch is new: its metrics come from params that never saw it
        state, m = step(state, ref, jax.tree.map(jnp.asarray, _pairs(rng, 16)))
        history.append({k: float(v) for k, v in m.items()})
    print("accuracy per step:", [round(h["rewards/accuracy"], 2) for h in history])
    last = history[-10:]
    accuracy = np.mean([h["rewards/accuracy"] for h in last])
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert accuracy > 0.9, accuracy
    assert np.mean([h["rewards/margin"] for h in last]) > 0.1
    assert np.mean([h["loss"] for h in last]) < math.log(2) - 0.1


def test_bad_beta():
    with pytest.raises(ValueError, match=r"dpo.beta must be > 0"):
        DpoConfig(beta=0.0)
