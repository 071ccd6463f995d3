"""Aux-loss-free balancing (`ling_jax.train.balancing`) and the Ling 2.0 training loss in `train_step`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import logged_losses, tiny_config

import ling_jax
from ling_jax.model.routing import route
from ling_jax.train.balancing import apply_bias_update, bias_delta, idle_experts
from ling_jax.train.losses import expert_load
from ling_jax.train.step import LossConfig, init_train_state, train_step

V2_TINY = dict(model_type="bailing_moe_v2", n_group=4, topk_group=2, routed_scaling_factor=2.5,
               moe_router_enable_expert_bias=True, use_qk_norm=True, partial_rotary_factor=0.5,
               num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.3, norm_head=False)


def _skewed_loads(steps: int, rate: float) -> list[np.ndarray]:
    """Expert loads [E] over `steps` bias updates of a sigmoid group-limited router that favours expert 0."""
    E, k = 16, 4
    logits = jax.random.normal(jax.random.key(0), (4096, E)).at[:, 0].add(4.0)

    @jax.jit
    def step(bias):
        _, _, experts = route(logits, k, score_function=ling_jax.ScoreFunction.SIGMOID, bias=bias, n_group=4,
                              topk_group=2, scaling=2.5)
        counts = jnp.bincount(experts.reshape(-1), length=E).astype(jnp.float32)
        return expert_load(counts), bias + bias_delta(counts[None], rate)[0]

    bias, loads = jnp.zeros(E), []
    for _ in range(steps):
        load, bias = step(bias)
        loads.append(np.asarray(load))
    return loads


def test_skewed_router_is_balanced_within_60_steps_with_bias_updates_and_stays_skewed_without():
    balanced, fixed = _skewed_loads(60, 0.02), _skewed_loads(60, 0.0)
    assert fixed[0][0] > 0.2 and fixed[-1][0] == fixed[0][0]  # expert 0 takes ~a quarter of all slots (mean 1/16)
    assert balanced[0][0] == fixed[0][0]
    assert max(balanced[-1]) < 1.5 / 16 and min(balanced[-1]) > 0.5 / 16, balanced[-1]
    assert int(idle_experts(jnp.asarray(balanced[-1])[None])[0]) == 0


def test_bias_update_is_the_sign_rule_outside_the_optimizer():
    old = {"moe_layers": {"mlp": {"expert_bias": jnp.zeros((2, 4)), "router": jnp.ones((2, 3, 4))}}}
    new = jax.tree.map(lambda a: a - 0.5, old)  # what an optimizer (weight decay) did
    counts = jnp.asarray([[10.0, 0.0, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0]])
    out = apply_bias_update(old, new, {"moe_layers": counts}, 0.1)
    np.testing.assert_allclose(out["moe_layers"]["mlp"]["expert_bias"], [[-0.1, 0.1, 0.0, 0.0], [0, 0, 0, 0]],
                               rtol=1e-7)
    np.testing.assert_array_equal(out["moe_layers"]["mlp"]["router"], new["moe_layers"]["mlp"]["router"])
    kept = apply_bias_update(old, new, {"moe_layers": counts}, 0.0)
    np.testing.assert_array_equal(kept["moe_layers"]["mlp"]["expert_bias"], 0.0)


@pytest.fixture(scope="module")
def v2_step():
    cfg = ling_jax.get_config("tiny", **V2_TINY)
    model = ling_jax.LingForCausalLM(cfg)
    params = ling_jax.init_params(model, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 2, cfg.vocab_size)
    batch = {"inputs": ids, "targets": jnp.concatenate([ids[:, 1:], jnp.full((2, 1), -100)], 1),
             "segment_ids": jnp.ones_like(ids), "positions": jnp.broadcast_to(jnp.arange(16), ids.shape)}
    optimizer = optax.adamw(1e-3, weight_decay=0.1)
    return model, params, batch, optimizer


@pytest.mark.slow  # compiles a v2 train step with MTP
def test_train_step_adds_the_mtp_loss_and_moves_every_bias_by_the_rate(v2_step):
    model, params, batch, optimizer = v2_step
    state = init_train_state(params, optimizer)
    new, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, optimizer=optimizer,
                                                   loss_cfg=LossConfig(bias_update_rate=0.01)))(state, batch)
    assert float(metrics["mtp_loss"]) > 0
    assert float(metrics["total_loss"]) == pytest.approx(float(metrics["loss"]) + 0.3 * float(metrics["mtp_loss"]),
                                                          rel=1e-5)
    for stack in ("moe_layers", "mtp_layers"):
        bias = params[stack]["mlp"]["expert_bias"] if stack == "moe_layers" else (
            params[stack]["layer"]["mlp"]["expert_bias"])
        moved = new.params[stack]["mlp"]["expert_bias"] if stack == "moe_layers" else (
            new.params[stack]["layer"]["mlp"]["expert_bias"])
        step = np.asarray(moved - bias)
        assert np.all(np.isclose(np.abs(step), 0.01) | (step == 0)) and np.any(step), stack
    still, _ = jax.jit(lambda s, b: train_step(s, b, model=model, optimizer=optimizer))(state, batch)
    np.testing.assert_array_equal(still.params["moe_layers"]["mlp"]["expert_bias"],
                                  params["moe_layers"]["mlp"]["expert_bias"])  # AdamW's decay did not touch it


def test_bias_rate_without_a_bias_is_refused(v2_step):
    _, _, batch, optimizer = v2_step
    v1 = ling_jax.LingForCausalLM(ling_jax.get_config("tiny"))
    with pytest.raises(ling_jax.ConfigError, match="moe_router_enable_expert_bias"):
        train_step(init_train_state(ling_jax.init_params(v1, jax.random.key(0)), optimizer), batch, model=v1,
                   optimizer=optimizer, loss_cfg=LossConfig(bias_update_rate=0.01))


def _v2_run(steps: int, **changes):
    return tiny_config(steps=steps, **{f"model_overrides.{k}": v for k, v in V2_TINY.items()},
                       **{"loss.bias_update_rate": 1e-3, "loss.balance_loss_weight": 0.0}, **changes)


@pytest.mark.slow
def test_v2_resume_is_bit_identical_with_the_bias_state(tmp_path):
    import train
    from ling_jax.io.loading import from_pretrained

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.run(_v2_run(6), straight)
    train.run(_v2_run(3), resumed)
    train.run(_v2_run(6), resumed)
    assert logged_losses(resumed) == logged_losses(straight)
    (_, a), (_, b) = from_pretrained(straight), from_pretrained(resumed)
    bias = a["moe_layers"]["mlp"]["expert_bias"]
    assert np.any(np.asarray(bias)) and np.array_equal(bias, b["moe_layers"]["mlp"]["expert_bias"])


@pytest.mark.slow  # a train.py process killed mid-run, then two more runs
def test_v2_resume_after_kill_9_is_bit_identical_with_the_bias_state(tmp_path):
    """As tests/test_train.py's kill -9 check, for a v2 model with MTP and bias balancing."""
    import os
    import sys

    from train_helpers import ROOT, kill_9_after_checkpoint

    import train
    from ling_jax.io.loading import from_pretrained

    workdir = str(tmp_path / "killed")
    settings = {"steps": 400, "checkpoint_every": 3, "log_every": 1, "eval_every": 3, "eval_batches": 2,
                "batch_size": 4, "seq_len": 32, "data.vocab_size": 256, "data.synthetic_num_docs": 2000,
                "peak_flops_per_device": 1e11, "loss.balance_loss_weight": 0.0, "loss.bias_update_rate": 0.001,
                "loss.accumulation_steps": 2, "schedule.decay_steps": 100,
                **{f"model_overrides.{k}": v for k, v in {**V2_TINY, "num_hidden_layers": 2, "vocab_size": 256,
                                                          "max_position_embeddings": 64}.items()}}
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "default.py"),
           "--workdir", workdir, *(f"--config.{k}={v}" for k, v in settings.items())]
    kill_9_after_checkpoint(cmd, workdir, 6, 400)
    reference = str(tmp_path / "reference")
    train.run(_v2_run(9, **{"schedule.decay_steps": 100}), workdir)
    train.run(_v2_run(9, **{"schedule.decay_steps": 100}), reference)
    resumed, ref = logged_losses(workdir), logged_losses(reference)
    assert all(resumed[s] == ref[s] for s in range(1, 10)), (resumed, ref)
    (_, a), (_, b) = from_pretrained(workdir), from_pretrained(reference)
    for stack in ("moe_layers",):
        np.testing.assert_array_equal(a[stack]["mlp"]["expert_bias"], b[stack]["mlp"]["expert_bias"])
