"""`ling_jax.train.step`: accumulation over microbatches is exact, and the loss is what the docstring says.

Every other training test runs with the same accumulation on both sides of its comparison, so an
accumulation bug would cancel out there; here 1 and 2 microbatches are compared directly,
on a batch whose rows have different numbers of real targets (padding), so a per-microbatch mean
instead of the global mean would show.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ling_jax
from ling_jax.config import IGNORE_INDEX
from ling_jax.train.losses import cross_entropy, load_balance_loss, router_stats, z_loss
from ling_jax.train.step import LossConfig, TrainState, accumulate_and_apply, eval_step, init_train_state, train_step

B, T = 4, 12


@pytest.fixture(scope="module")
def setup():
    cfg = ling_jax.get_config("tiny", vocab_size=64, max_position_embeddings=64)
    model = ling_jax.LingForCausalLM(cfg)
    params = ling_jax.init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, cfg.vocab_size, (B, T)).astype(np.int32)
    segments = np.ones((B, T), np.int32)
    segments[1, 9:] = 0  # padding at the end of rows 1 and 3: the microbatches hold different token counts
    segments[3, 4:] = 0
    targets = np.where(segments[:, 1:] > 0, inputs[:, 1:], IGNORE_INDEX)
    targets = np.concatenate([targets, np.full((B, 1), IGNORE_INDEX, np.int32)], 1).astype(np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    batch = {"inputs": inputs, "targets": targets, "segment_ids": segments, "positions": positions}
    return model, params, {k: jnp.asarray(v) for k, v in batch.items()}


_STEPS: dict[tuple, tuple] = {}  # one compile per (accumulation, weights): the tests share the runs


def _step(model, params, batch, accumulation: int, **weights):
    key = (accumulation, tuple(sorted(weights.items())))
    if key not in _STEPS:
        _STEPS[key] = _run_step(model, params, batch, accumulation, **weights)
    return _STEPS[key]


def _run_step(model, params, batch, accumulation: int, **weights):
    optimizer = optax.sgd(1.0)  # the update is minus the gradient, so params carry the gradient exactly
    cfg = LossConfig(accumulation_steps=accumulation, **weights)
    step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, loss_cfg=cfg))
    new_state, metrics = step(init_train_state(params, optimizer), batch)
    grads = jax.tree.map(lambda a, b: a - b, params, new_state.params)
    return new_state, metrics, grads


def test_microbatches_give_the_loss_and_gradients_of_one_batch(setup):
    model, params, batch = setup
    _, one, g1 = _step(model, params, batch, 1, z_loss_weight=1e-3)
    state, many, gn = _step(model, params, batch, 2, z_loss_weight=1e-3)
    assert int(state.step) == 1
    for key in ("loss", "total_loss", "tokens", "z_loss"):
        np.testing.assert_allclose(many[key], one[key], rtol=2e-6, err_msg=key)
    np.testing.assert_allclose(many["grad_norm"], one["grad_norm"], rtol=1e-5)
    eps = float(jnp.finfo(jnp.float32).eps)
    leaves = zip(jax.tree_util.tree_leaves_with_path(gn), jax.tree.leaves(g1), jax.tree.leaves(params), strict=True)
    for (path, a), b, p in leaves:
        # The gradients are read back as params - new_params, which rounds to an ulp of the parameter.
        bound = 1e-5 * float(jnp.max(jnp.abs(b))) + 2 * eps * float(jnp.max(jnp.abs(p)))
        assert float(jnp.max(jnp.abs(a - b))) <= bound, jax.tree_util.keystr(path)
    assert float(one["grad_norm"]) > 0


def _balance(model, params, rows):
    _, state = model.apply({"params": params}, rows["inputs"], rows["segment_ids"] > 0, rows["positions"],
                           rows["segment_ids"], deterministic=False, mutable=["intermediates"])
    stats = router_stats(state["intermediates"])
    cfg = model.config
    return float(load_balance_loss(stats["tokens_per_expert"], stats["router_prob_mean"], cfg.num_experts,
                                   cfg.num_experts_per_tok))


@pytest.mark.slow  # 30 s: another accumulation compile
def test_balance_loss_is_per_microbatch_weighted_by_tokens(setup):
    """The balance loss is not linear in the routing statistics: with accumulation it is each microbatch's
    balance loss weighted by its share of the target tokens (as MaxText does), not the whole batch's."""
    model, params, batch = setup
    _, m, _ = _step(model, params, batch, 2, z_loss_weight=0.5, balance_loss_weight=0.25)
    halves = [jax.tree.map(lambda x, i=i: x[2 * i:2 * i + 2], batch) for i in range(2)]
    counts = [int(np.sum(np.asarray(h["targets"]) != IGNORE_INDEX)) for h in halves]
    assert counts == [8 + 11, 3 + 11]
    expected = sum(_balance(model, params, h) * c / sum(counts) for h, c in zip(halves, counts, strict=True))
    assert float(m["balance_loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(m["balance_loss"]) > 0.9  # a real value: about 1 when routing is even


def test_total_loss_is_nll_plus_weighted_aux(setup):
    """With accumulation (2 microbatches): nll and z-loss are the whole batch's, the balance loss the
    metric the step reports (checked against per-microbatch values above)."""
    model, params, batch = setup
    zw, bw = 0.5, 0.25
    _, m, _ = _step(model, params, batch, 2, z_loss_weight=zw, balance_loss_weight=bw)

    logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"] > 0, batch["positions"],
                         batch["segment_ids"], deterministic=False)
    nll_sum, count = cross_entropy(logits, batch["targets"])
    nll = float(nll_sum / count)
    z = float(z_loss(logits, batch["targets"] != IGNORE_INDEX))
    balance = float(m["balance_loss"])
    assert int(count) == int(np.sum(np.asarray(batch["targets"]) != IGNORE_INDEX)) == 8 + 11 + 3 + 11
    assert float(m["loss"]) == pytest.approx(nll, rel=1e-6)
    assert float(m["z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(m["total_loss"]) == pytest.approx(nll + zw * z + bw * balance, rel=1e-6)
    assert z > 1.0  # a real value, not zero
    np.testing.assert_allclose(np.sum(m["expert_load"], -1), 1.0, rtol=1e-6)


def test_eval_step_sums_match_the_train_loss(setup):
    model, params, batch = setup
    _, m, _ = _step(model, params, batch, 2, z_loss_weight=1e-3)
    sums = jax.jit(functools.partial(eval_step, model=model))(params, batch)
    assert float(sums["nll_sum"] / sums["tokens"]) == pytest.approx(float(m["loss"]), rel=1e-6)


def test_accumulate_and_apply_sums_metrics_and_applies_one_update():
    params = {"w": jnp.array([1.0, -2.0])}
    batch = {"x": jnp.arange(8.0).reshape(4, 2)}
    optimizer = optax.sgd(0.5)

    def loss_fn(p, mb):  # a share of the mean over the whole batch of 4 rows
        loss = jnp.sum(mb["x"] @ p["w"]) / 4
        return loss, {"loss": loss, "rows": jnp.float32(mb["x"].shape[0])}

    state = TrainState(step=jnp.int32(3), params=params, opt_state=optimizer.init(params))
    new, norm, sums = accumulate_and_apply(state, batch, loss_fn, optimizer, 2)
    grad = np.sum(np.arange(8.0).reshape(4, 2), 0) / 4  # [3, 4]
    np.testing.assert_allclose(new.params["w"], np.array([1.0, -2.0]) - 0.5 * grad)
    assert float(norm) == pytest.approx(5.0)
    assert float(sums["rows"]) == 4.0
    assert float(sums["loss"]) == pytest.approx(float(np.sum(np.arange(8.0).reshape(4, 2) @ [1.0, -2.0]) / 4))
    assert int(new.step) == 4
