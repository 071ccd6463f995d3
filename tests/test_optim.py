"""Learning-rate schedules against hand-computed values, the decay mask, AdamW and clipping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import ling_jax
from ling_jax.train.optim import (
    NO_DECAY_NAMES,
    PhaseKind,
    ScheduleKind,
    decay_mask,
    default_optimizer_config,
    default_schedule_config,
    inverse_sqrt_schedule,
    make_optimizer,
    make_schedule,
    paper_schedule_config,
    phases_schedule,
    schedule_steps,
)


def _at(schedule, step: int) -> float:
    return float(schedule(jnp.asarray(step, jnp.int32)))


def _check(schedule, expected: dict[int, float]) -> None:
    for step, value in expected.items():
        assert _at(schedule, step) == pytest.approx(value, rel=1e-5, abs=1e-12), f"step {step}"


def _phases_cfg(phases, init_value=0.0) -> ml_collections.ConfigDict:
    cfg = default_schedule_config()
    cfg.kind = ScheduleKind.PHASES.value
    cfg.init_value = init_value
    cfg.phases = phases
    return cfg


def test_warmup_cosine_boundaries():
    cfg = default_schedule_config()
    cfg.update(init_value=0.0, peak_value=1e-3, warmup_steps=100, decay_steps=1100, end_value=1e-4)
    schedule = make_schedule(cfg)
    # warmup start, midpoint, end = cosine start; cosine midpoint; end; held afterwards.
    _check(schedule, {0: 0.0, 50: 5e-4, 100: 1e-3, 600: 1e-4 + 0.5 * 9e-4, 1100: 1e-4, 5000: 1e-4})
    reference = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 1100, 1e-4)
    steps = jnp.arange(0, 1300, 7)
    np.testing.assert_allclose(jax.vmap(schedule)(steps), jax.vmap(reference)(steps), rtol=1e-5, atol=1e-10)
    assert schedule_steps(cfg) == 1100


def test_paper_recipe_boundaries():
    schedule = make_schedule(_phases_cfg([
        dict(kind="linear", steps=100, end=3e-4),
        dict(kind="multistep", steps=1000, boundaries=[300, 600], values=[3e-4, 2e-4, 1e-4]),
        dict(kind="cosine", steps=400, end=2e-5),
        dict(kind="inverse_sqrt", steps=500, end=1e-5),
    ]))
    tau = 500 / ((2e-5 / 1e-5) ** 2 - 1)  # the default: plain start / sqrt(1 + t / tau)
    _check(schedule, {
        0: 0.0, 50: 1.5e-4, 100: 3e-4,  # linear warmup
        399: 3e-4, 400: 2e-4, 699: 2e-4, 700: 1e-4, 1099: 1e-4,  # multistep, boundaries relative to its start
        1100: 1e-4, 1300: (1e-4 + 2e-5) / 2,  # cosine from the previous end to its floor
        1500: 2e-5, 1750: 2e-5 / math.sqrt(1 + 250 / tau), 2000: 1e-5,  # inverse sqrt annealing
        10_000: 1e-5,  # held after the last phase
    })
    assert schedule_steps(_phases_cfg([dict(kind="linear", steps=100, end=1.0), dict(kind="constant", steps=7)])) == 107


def test_inverse_sqrt_explicit_tau():
    schedule = inverse_sqrt_schedule(1.0, 0.1, 100, tau=10.0)
    g = lambda t: 1 / math.sqrt(1 + t / 10)  # noqa: E731
    _check(schedule, {0: 1.0, 50: 0.1 + 0.9 * (g(50) - g(100)) / (1 - g(100)), 100: 0.1, 200: 0.1})
    with pytest.raises(ValueError, match="tau"):
        inverse_sqrt_schedule(1.0, 2.0, 100)  # rising: the plain form cannot, tau is needed
    rising = inverse_sqrt_schedule(1.0, 2.0, 100, tau=10.0)
    _check(rising, {0: 1.0, 100: 2.0})


def test_phase_subsets_compose_and_continue():
    schedule = phases_schedule([
        dict(kind="cosine", steps=10, end=0.5),  # starts from init_value
        dict(kind="constant", steps=5),  # holds the previous end
        dict(kind="linear", steps=10, start=2.0, end=1.0),  # explicit start: a jump
        dict(kind="inverse_sqrt", steps=20, end=0.25),
    ], init_value=1.0)
    _check(schedule, {0: 1.0, 5: 0.75, 10: 0.5, 14: 0.5, 15: 2.0, 20: 1.5, 25: 1.0, 45: 0.25, 100: 0.25})
    _check(phases_schedule([], init_value=3e-4), {0: 3e-4, 10**6: 3e-4})
    single = make_schedule(_phases_cfg([dict(kind=PhaseKind.MULTISTEP.value, steps=10, boundaries=[],
                                             values=[0.1])]))
    _check(single, {0: 0.1, 50: 0.1})


def test_schedule_under_jit_and_default_configs():
    schedule = make_schedule(paper_schedule_config())
    steps = jnp.array([0, 1000, 2000, 62_000, 100_000], jnp.int32)
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), [_at(schedule, int(s)) for s in steps], rtol=1e-6)
    assert schedule_steps(paper_schedule_config()) == 100_000
    assert _at(schedule, 100_000) == pytest.approx(1e-5)
    assert _at(make_schedule(default_schedule_config()), 2000) == pytest.approx(3e-4)


@pytest.mark.parametrize("phase, message", [
    (dict(kind="exponential", steps=3), "kind must be one of"),
    (dict(kind="linear", steps=3), "missing 'end'"),
    (dict(kind="linear", steps=0, end=1.0), "steps must be an int >= 1"),
    (dict(kind="cosine", steps=3, end=1.0, tau=2.0), "unknown keys"),
    (dict(kind="multistep", steps=10, boundaries=[5, 3], values=[1, 2, 3]), "boundaries"),
    (dict(kind="multistep", steps=10, boundaries=[5, 12], values=[1, 2, 3]), "boundaries must lie in"),
    (dict(kind="multistep", steps=10, boundaries=[5], values=[1, 2, 3]), "one more value"),
    (dict(kind="inverse_sqrt", steps=10, end=0.0), "0 < end < start"),
])
def test_bad_phases(phase, message):
    with pytest.raises(ValueError, match=message):
        phases_schedule([phase], init_value=1.0)


def test_bad_schedule_kind_and_warmup():
    cfg = default_schedule_config()
    cfg.kind = "triangle"
    with pytest.raises(ValueError, match="schedule kind"):
        make_schedule(cfg)
    cfg = default_schedule_config()
    cfg.warmup_steps = cfg.decay_steps
    with pytest.raises(ValueError, match="warmup_steps < decay_steps"):
        make_schedule(cfg)


@pytest.fixture(scope="module")
def tiny_params():
    """The real param tree of `tiny` with biases (structure from `init_params`, traced without compiling).

    Filled with random non-zero values, so that decay would visibly move the biases (initialised to 0) too.
    """
    model = ling_jax.LingForCausalLM(ling_jax.get_config("tiny", use_bias=True, use_qkv_bias=True))
    shapes = jax.eval_shape(lambda: ling_jax.init_params(model, jax.random.key(0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)


def _named(tree) -> dict[str, object]:
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_decay_mask_on_real_params(tiny_params):
    mask = _named(decay_mask(tiny_params))
    off = sorted(name for name, decay in mask.items() if not decay)
    assert off == sorted([
        "dense_layers/attention/k_bias", "dense_layers/attention/o_bias", "dense_layers/attention/q_bias",
        "dense_layers/attention/v_bias", "dense_layers/input_norm/scale", "dense_layers/post_attention_norm/scale",
        "moe_layers/attention/k_bias", "moe_layers/attention/o_bias", "moe_layers/attention/q_bias",
        "moe_layers/attention/v_bias", "moe_layers/input_norm/scale", "moe_layers/post_attention_norm/scale",
        "norm/scale",
    ])
    for name in ("embed/embedding", "lm_head/kernel", "moe_layers/mlp/router", "moe_layers/mlp/gate_proj",
                 "moe_layers/mlp/shared_experts/down_proj", "dense_layers/attention/q_proj"):
        assert mask[name] is True, name
    assert all(name.rsplit("/", 1)[-1] in NO_DECAY_NAMES for name in off)


def test_adamw_decays_only_unmasked_leaves(tiny_params):
    cfg = default_optimizer_config()
    lr, wd = 0.1, cfg.weight_decay
    optimizer = make_optimizer(cfg, optax.constant_schedule(lr))
    state = optimizer.init(tiny_params)
    zeros = jax.tree.map(jnp.zeros_like, tiny_params)
    updates, _ = jax.jit(optimizer.update)(zeros, state, tiny_params)  # one compile beats ~100 eager ones
    new = _named(optax.apply_updates(tiny_params, updates))
    old, mask = _named(tiny_params), _named(decay_mask(tiny_params))
    for name, value in new.items():
        if mask[name]:
            np.testing.assert_allclose(value, old[name] * (1 - lr * wd), rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(value, old[name], err_msg=name)


@pytest.mark.parametrize("clip_norm", [None, 1.0, 100.0])
def test_clipping(clip_norm):
    cfg = default_optimizer_config()
    cfg.update(weight_decay=0.0, eps=1.0, clip_norm=clip_norm)  # eps = 1 keeps Adam's first step scale-sensitive
    optimizer = make_optimizer(cfg, 1.0)
    params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    grads = {"w": jnp.arange(12.0).reshape(3, 4) / 2, "b": jnp.array([3.0, -4.0, 0.0, 1.0])}
    norm = float(optax.tree.norm(grads))
    assert 1.0 < norm < 100.0
    scale = 1.0 if clip_norm is None else min(1.0, clip_norm / norm)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    for key, g in grads.items():
        g = g * scale  # first Adam step: m_hat = g, sqrt(v_hat) = |g|
        np.testing.assert_allclose(updates[key], -g / (jnp.abs(g) + 1.0), rtol=1e-5, atol=1e-7, err_msg=key)


def test_optimizer_config_errors_and_mu_dtype():
    cfg = default_optimizer_config()
    cfg.mu_dtype = "bfloat16"
    state = make_optimizer(cfg, 1e-3).init({"w": jnp.ones(3)})
    mus = [s.mu for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
    assert mus and mus[0]["w"].dtype == jnp.bfloat16
    cfg = default_optimizer_config()
    cfg.clip_norm = 0.0
    with pytest.raises(ValueError, match="clip_norm"):
        make_optimizer(cfg, 1e-3)
