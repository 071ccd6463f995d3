"""Expert parallelism on 8 fake CPU devices: every mesh gives the single-device numbers.

The multi-device checks run once, in a subprocess with
`--xla_force_host_platform_device_count=8` (the rest of the suite runs on one
device in this process), and print their measurements as one JSON line; the
tests below assert on them. Relative errors are `|a - b| / |b|` (Frobenius
norms) per array, the worst over arrays.

The whole-model checks use the `REFERENCE` grouped matmul (the expert
parallelism does not depend on it, and it compiles in half the time of the
XLA kernel); the layer-level exchange checks run the default (`XLA` on CPU)
grouped matmul on the exchanged buffers.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

# The 8-device subprocess takes about 160 s on 2 cores: the whole module is a slow check.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = {
    "expert8": {"expert": 8},
    "data2_expert4": {"data": 2, "expert": 4},
    "fsdp2_expert2_tensor2": {"fsdp": 2, "expert": 2, "tensor": 2},
    "data4_expert2": {"data": 4, "expert": 2},
}
TOL = 1e-5
EXCHANGE_MESHES = ("expert8", "fsdp2_expert2_tensor2")  # 1 and 4 experts per device


@pytest.fixture(scope="module")
def results(fixture_dir) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, str(fixture_dir)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("name", list(MESHES))
def test_logits_and_every_gradient_match_single_device(results, name):
    r = results["meshes"][name]
    assert r["devices"] == 8 and r["all_to_all"] == (MESHES[name]["expert"] > 1)
    assert r["logits"] < TOL, r
    assert r["loss"] < TOL, r
    assert r["grads"] < TOL, r  # worst parameter, named in r["worst"]
    assert r["num_grads"] == results["num_params"] > 10


@pytest.mark.parametrize("name", list(MESHES))
def test_router_statistics_stay_global(results, name):
    r = results["meshes"][name]
    assert r["stats"] < TOL, r
    # 8 x 16 tokens, 3 left-padded in each of 4 rows: 116 real tokens, top-2 each, in both MoE layers.
    assert r["tokens_per_expert_sum"] == [2 * 116, 2 * 116]


def test_train_step_gives_the_same_updated_params(results):
    r = results["train_step"]
    assert r["params"] < TOL, r
    # AdamW's first update is about lr * g / |g| per entry, which magnifies the round-off of small gradients.
    assert r["updates"] < 1e-3, r
    assert r["loss"] < TOL, r
    assert r["changed"] > 0.5  # the step really moved most parameters


@pytest.mark.parametrize("name", EXCHANGE_MESHES)
def test_ragged_exchange_equals_padded_exchange(results, name):
    r = results["uniform"][name]
    assert r["ragged_vs_padded"] < 1e-6, r
    assert r["padded_vs_single"] < TOL, r


@pytest.mark.parametrize("name", EXCHANGE_MESHES)
def test_skewed_routing_with_empty_experts(results, name):
    r = results["skewed"][name]
    assert r["experts_used"] == [0, 1]  # six experts get no rows; device 0 (and 1 when El = 1) gets all rows
    assert r["ragged_vs_padded"] < 1e-6, r
    assert r["padded_vs_single"] < TOL, r


def test_real_ragged_all_to_all_lowers_on_cpu(results):
    assert results["ragged_lowering"] == {"forward": 2, "backward": 4}


def test_reference_collective_follows_the_documented_example(results):
    assert results["reference_example"] == [[1, 3, 0, 0], [2, 2, 4, 0]]


def test_token_count_not_divisible_by_the_mesh_is_padded(results):
    assert results["padding"] < TOL, results["padding"]  # 15 tokens over 8 token shards


def test_auto_exchange_is_padded_on_cpu():
    from ling_jax.model.expert_parallel import Exchange, resolve_exchange

    assert resolve_exchange(Exchange.AUTO) is Exchange.PADDED  # this process runs on CPU
    assert resolve_exchange("ragged") is Exchange.RAGGED




# ----------------------------------------------------------------------------------------------
# The worker (run as a script with 8 devices).


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _worst(a_tree, b_tree) -> tuple[float, str, int]:
    import jax

    rows = [(_rel(a, b), jax.tree_util.keystr(p))
            for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(a_tree), jax.tree.leaves(b_tree), strict=True)]
    worst = max(rows)
    return worst[0], worst[1], len(rows)


def _batch(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(2, vocab, (8, 16)).astype(np.int32)
    mask = np.ones((8, 16), np.int32)
    mask[::2, :3] = 0  # left padding in 4 rows
    return {"ids": ids, "mask": mask}


def _check_meshes(model, params, batch) -> dict:
    import jax
    import jax.numpy as jnp

    from ling_jax import logical_axes
    from ling_jax.train.losses import next_token_loss

    ids, mask = jnp.asarray(batch["ids"]), jnp.asarray(batch["mask"])

    def loss_fn(p, ids, mask):
        logits, state = model.apply({"params": p}, ids, mask, mutable=["intermediates"])
        stats = state["intermediates"]["moe_layers"]["mlp"]
        return next_token_loss(logits, jnp.where(mask > 0, ids, -100)), (logits, stats)

    step = jax.value_and_grad(loss_fn, has_aux=True)
    (loss0, (logits0, stats0)), grads0 = jax.jit(step)(params, ids, mask)
    specs = logical_axes(model)
    out = {}
    for name, shape in MESHES.items():
        ((loss, (logits, stats)), grads), hlo, mesh = run_on_mesh(step, params, specs, shape, ids, mask)
        g, worst, n = _worst(grads, grads0)
        out[name] = {"devices": mesh.size, "all_to_all": "all-to-all" in hlo, "logits": _rel(logits, logits0),
                     "loss": _rel(loss, loss0), "grads": g, "worst": worst, "num_grads": n,
                     "stats": _worst(stats, stats0)[0],
                     "tokens_per_expert_sum": [float(s) for s in np.asarray(stats["tokens_per_expert"][0]).sum(-1)]}
    return out


def run_on_mesh(step, params, specs, shape: dict, ids, mask):
    """`step(params, ids, mask)` compiled for a mesh of `shape` with the logical shardings: (outputs, HLO, mesh)."""
    import jax

    from ling_jax.model.sharding import batch_sharding, logical_shardings, make_mesh, use_mesh, validate_shardings

    mesh = make_mesh(shape)
    validate_shardings(params, specs, mesh)
    p_sh, d_sh = logical_shardings(specs, mesh), batch_sharding(mesh)
    with use_mesh(mesh):
        fn = jax.jit(step, in_shardings=(p_sh, d_sh, d_sh)).lower(params, ids, mask).compile()
    return fn(jax.device_put(params, p_sh), jax.device_put(ids, d_sh), jax.device_put(mask, d_sh)), fn.as_text(), mesh


def _check_train_step(model, params, batch) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from ling_jax import logical_axes
    from ling_jax.model.sharding import batch_sharding, logical_shardings, make_mesh, with_mesh
    from ling_jax.train.step import LossConfig, TrainState, init_train_state, train_step

    ids, mask = batch["ids"], batch["mask"]
    data = {"inputs": ids, "targets": np.where(np.roll(mask, -1, 1) > 0, np.roll(ids, -1, 1), -100),
            "segment_ids": mask, "positions": np.maximum(np.cumsum(mask, 1) - 1, 0)}
    data["targets"][:, -1] = -100
    data = {k: jnp.asarray(v, jnp.int32) for k, v in data.items()}
    optimizer = optax.adamw(1e-3, weight_decay=0.1)
    fn = functools.partial(train_step, model=model, optimizer=optimizer,
                           loss_cfg=LossConfig(z_loss_weight=1e-3, balance_loss_weight=1e-2, accumulation_steps=2))
    state = init_train_state(params, optimizer)
    ref, ref_metrics = jax.jit(fn)(state, data)
    mesh = make_mesh(MESHES["fsdp2_expert2_tensor2"])
    p_sh = logical_shardings(logical_axes(model), mesh)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_sh = TrainState(step=rep, params=p_sh, opt_state=jax.tree.map(lambda _: rep, state.opt_state))
    step = with_mesh(jax.jit(fn, in_shardings=(state_sh, batch_sharding(mesh)), out_shardings=(state_sh, None)), mesh)
    new, metrics = step(jax.device_put(state, state_sh), data)
    delta = lambda s: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s.params, params)  # noqa: E731
    moved = [float(np.mean(d != 0)) for d in jax.tree.leaves(delta(ref))]
    updates, worst, _ = _worst(delta(new), delta(ref))
    return {"params": _worst(new.params, ref.params)[0], "updates": updates, "worst_update": worst,
            "loss": _rel(metrics["total_loss"], ref_metrics["total_loss"]), "changed": float(np.mean(moved))}


def _layer_inputs(cfg, skewed: bool):
    """Tokens [64, D], router weights and experts [64, k], expert weights, and a cotangent [64, D]."""
    import jax
    import jax.numpy as jnp

    from ling_jax.model.routing import route

    kx, kr, kg, ku, kd, kc = jax.random.split(jax.random.key(3), 6)
    E, D, F, k = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    x = jax.random.normal(kx, (64, D))
    router = jax.random.normal(kr, (D, E))
    if skewed:  # a constant feature that only experts 0 and 1 read: every token picks them
        x = x.at[:, 0].set(10.0)
        router = router.at[0].set(jnp.asarray([5.0, 4.0] + [-5.0] * (E - 2)))
    _, weights, experts = route(x @ router, k, True)
    w = [jax.random.normal(key, shape) * 0.2 for key, shape in ((kg, (E, D, F)), (ku, (E, D, F)), (kd, (E, F, D)))]
    return (x, weights, *w), experts, jax.random.normal(kc, (64, D))


def _layer_fn(cfg, mesh, **kw):
    """jit(value_and_grad) of <y, ct> + |y|^2 / 2 over (x, weights, wg, wu, wd) for the routed experts."""
    import jax
    import jax.numpy as jnp

    from ling_jax.config import GmmImpl
    from ling_jax.model import expert_parallel as ep
    from ling_jax.model.experts import routed_ffn

    def f(args, experts, ct):
        x, weights, wg, wu, wd = args
        if mesh is None:  # the single-device layer's routed experts
            y = routed_ffn(x, weights, experts, wg, wu, wd, num_experts=cfg.num_experts, impl=GmmImpl.AUTO)
        else:
            y = ep.expert_parallel_ffn(x, weights, experts, wg, wu, wd, mesh=mesh, **kw)
        return jnp.sum(y * ct) + 0.5 * jnp.sum(y * y), y

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def _check_exchanges(cfg) -> dict:
    from ling_jax.model import expert_parallel as ep
    from ling_jax.model.sharding import make_mesh

    cases = {"uniform": _layer_inputs(cfg, False), "skewed": _layer_inputs(cfg, True)}
    single = _layer_fn(cfg, None)
    out = {case: {} for case in cases}
    for name in EXCHANGE_MESHES:
        mesh = make_mesh(MESHES[name])
        padded = _layer_fn(cfg, mesh, exchange=ep.Exchange.PADDED)
        ragged = _layer_fn(cfg, mesh, exchange=ep.Exchange.RAGGED, collective=ep.ragged_all_to_all_reference)
        for case, inputs in cases.items():
            p, r, s = padded(*inputs), ragged(*inputs), single(*inputs)
            out[case][name] = {"ragged_vs_padded": _worst(r, p)[0], "padded_vs_single": _worst(p, s)[0],
                               "experts_used": sorted({int(i) for i in np.asarray(inputs[1]).reshape(-1)})}
    return out


def _check_lowering(cfg) -> dict:
    import jax
    import jax.numpy as jnp

    from ling_jax.model import expert_parallel as ep
    from ling_jax.model.sharding import make_mesh

    (x, weights, wg, wu, wd), experts, _ = _layer_inputs(cfg, False)
    mesh = make_mesh(MESHES["data2_expert4"])

    def f(x, wg):
        y = ep.expert_parallel_ffn(x, weights, experts, wg, wu, wd, mesh=mesh, exchange=ep.Exchange.RAGGED)
        return jnp.sum(y * y)

    fwd = jax.jit(f).lower(x, wg).as_text()
    bwd = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, wg).as_text()
    # Forward: dispatch and return; backward: those two again plus their transposes.
    return {"forward": fwd.count("ragged_all_to_all"), "backward": bwd.count("ragged_all_to_all")}


def _check_padding(cfg) -> float:
    """The MoE layer on 3 x 5 tokens under `jax.set_mesh` alone (no logical rules, so no batch constraint)."""
    import flax.linen as nn
    import jax

    from ling_jax.model.moe import MoE
    from ling_jax.model.sharding import make_mesh

    layer = MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (3, 5, cfg.hidden_size))
    params = nn.unbox(layer.init(jax.random.key(1), x)["params"])
    apply = jax.jit(lambda p, x: layer.apply({"params": p}, x))
    ref = apply(params, x)
    with jax.set_mesh(make_mesh(MESHES["data2_expert4"])):
        return _rel(apply(params, x), ref)


def _reference_example() -> list:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec

    from ling_jax.model.expert_parallel import ragged_all_to_all_reference
    from ling_jax.model.sharding import EXPERT_AXIS

    mesh = Mesh(np.asarray(jax.devices()[:2]), (EXPERT_AXIS,))
    arrays = [[1, 2, 2, 3, 4, 0], [0] * 8, [0, 1, 0, 1], [1, 2, 1, 1], [0, 0, 1, 2], [1, 1, 2, 1]]

    def f(operand, output, *offsets_and_sizes):
        return ragged_all_to_all_reference(operand, output, *offsets_and_sizes, axis_name=EXPERT_AXIS)

    spec = PartitionSpec(EXPERT_AXIS)
    out = jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(
        *(jnp.asarray(a, jnp.int32) for a in arrays))
    return np.asarray(out).reshape(2, 4).tolist()


def _worker(fixture: str) -> dict:
    import jax

    import ling_jax

    assert jax.device_count() == 8
    model, params = ling_jax.from_pretrained(fixture, gmm_impl=ling_jax.GmmImpl.REFERENCE)
    batch = _batch(model.config.vocab_size)
    out, seconds = {"num_params": len(jax.tree.leaves(params))}, {}
    checks = {"meshes": lambda: _check_meshes(model, params, batch),
              "train_step": lambda: _check_train_step(model, params, batch),
              "exchanges": lambda: _check_exchanges(model.config),
              "ragged_lowering": lambda: _check_lowering(model.config),
              "padding": lambda: _check_padding(model.config), "reference_example": _reference_example}
    for name, check in checks.items():
        t0 = time.perf_counter()
        result = check()
        if name == "exchanges":
            out.update(result)
        else:
            out[name] = result
        seconds[name] = round(time.perf_counter() - t0, 1)
    return out | {"check_seconds": seconds}


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
