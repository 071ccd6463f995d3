"""Every TPU code path compiled ahead of time with the real XLA:TPU and Mosaic compilers, on this CPU host.

Compile-only: a mesh of abstract v5p devices (`ling_jax.model.aot.tpu_topology`, from `libtpu`, a test
dependency) makes every `AUTO` choice take its TPU path, and `lower(...).compile()` fails when a path
cannot be traced, lowered or compiled for TPU. Nothing runs.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import ling_jax
import pallas_kernels
from ling_jax.config import AttentionImpl, Exchange, GmmImpl
from ling_jax.inference.aot import compile_decode_step
from ling_jax.model import attention
from ling_jax.model.aot import MemoryUse, TopologyError, compile_abstract, tpu_topology
from ling_jax.model.expert_parallel import resolve_exchange
from ling_jax.model.grouped_matmul import resolve_impl
from ling_jax.model.sharding import make_mesh, use_mesh
from ling_jax.train.aot import compile_train_step
from ling_jax.train.step import LossConfig
from pallas_kernels.common import target_platform

TOPOLOGY = "v5p:2x2x1"  # 4 chips


@pytest.fixture(scope="module")
def devices():
    return tpu_topology(TOPOLOGY)


def _lite(layers: int, **changes) -> ling_jax.LingForCausalLM:
    """Ling-Coder-lite at full width with `layers` layers (the scanned layer body is what compiles)."""
    cfg = ling_jax.get_config("ling_coder_lite", num_hidden_layers=layers, **changes)
    return ling_jax.LingForCausalLM(cfg, dtype=jnp.bfloat16)


def test_auto_choices_follow_the_mesh_devices_not_the_host(devices):
    assert jax.default_backend() == "cpu" and target_platform() == "cpu"
    with use_mesh(make_mesh({"expert": 4}, devices=devices)):
        assert target_platform() == "tpu"
        assert attention.resolve_attention_impl(AttentionImpl.AUTO, jnp.bfloat16) is AttentionImpl.SPLASH
        assert resolve_impl(GmmImpl.AUTO) is GmmImpl.PALLAS
        assert resolve_exchange(Exchange.AUTO) is Exchange.RAGGED
    assert resolve_impl(GmmImpl.AUTO) is GmmImpl.XLA and resolve_exchange(Exchange.AUTO) is Exchange.PADDED


def test_unknown_topology_is_a_clear_error():
    with pytest.raises(TopologyError, match="v9z:1x1"):
        tpu_topology("v9z:1x1")


def _splash_loss_fn(model):
    def loss(params, ids):
        return jnp.mean(model.apply({"params": params}, ids, deterministic=False))
    return loss


@pytest.mark.slow  # 40 s in interpret mode; test_splash_compiles_for_tpu_traced_twice covers the TPU path
def test_splash_traces_twice_under_scan_and_grad_in_interpret_mode():
    """The regression: the splash kernel was memoised with arrays from the first trace (under `nn.scan`),
    and the second trace died with an `UnexpectedTracerError`."""
    cfg = ling_jax.get_config("tiny", attention_impl="splash")
    model = ling_jax.LingForCausalLM(cfg)
    ids = jnp.ones((1, 128), jnp.int32)
    params = ling_jax.init_params(model, jax.random.key(0))  # trace 1 (init, under nn.scan)
    grad = jax.jit(jax.grad(_splash_loss_fn(model)))
    g1 = grad(params, ids)  # trace 2: forward and backward through the kernel
    g2 = jax.jit(jax.grad(_splash_loss_fn(model)))(params, ids + 1)  # trace 3, a new jit
    leaf = lambda g: g["moe_layers"]["attention"]["q_proj"]  # noqa: E731
    assert leaf(g1).shape == leaf(params).shape and bool(jnp.all(jnp.isfinite(leaf(g1))))
    assert float(jnp.max(jnp.abs(leaf(g1) - leaf(g2)))) > 0  # different inputs, different gradients


@pytest.mark.slow  # 25 s
def test_splash_compiles_for_tpu_traced_twice(devices):
    model = ling_jax.LingForCausalLM(ling_jax.get_config("tiny", attention_impl="splash"), dtype=jnp.bfloat16)
    mesh = make_mesh({"data": 4}, devices=devices)
    params = ling_jax.abstract_params(model.config)
    with use_mesh(mesh):
        rep = NamedSharding(mesh, PartitionSpec())
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params)
        ids = jax.ShapeDtypeStruct((8, 256), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec("data")))
        for _ in range(2):
            compiled = compile_abstract(jax.grad(_splash_loss_fn(model)), params, ids)
            assert "tpu_custom_call" in compiled.as_text()  # the Mosaic kernel, not an XLA fallback


@pytest.mark.parametrize("shape", [{"expert": 4},  # data x expert: multi-slice
                                   pytest.param({"fsdp": 2, "tensor": 2}, marks=pytest.mark.slow)])
def test_tiny_train_and_decode_steps_compile(devices, shape):
    model = ling_jax.LingForCausalLM(ling_jax.get_config("tiny"), dtype=jnp.bfloat16)
    mesh = make_mesh(shape, devices=devices)
    train = compile_train_step(model, optax.adamw(1e-3), LossConfig(accumulation_steps=2, balance_loss_weight=0.01),
                               mesh, batch_size=8, seq_len=256)
    decode = compile_decode_step(model, mesh, batch_size=8, max_len=512)
    for program in (train, decode):
        assert isinstance(program.memory, MemoryUse) and program.memory.temporaries > 0
        assert program.memory.aliased > 0  # the state / the cache is donated and updated in place
    total, _ = ling_jax.count_params(model.config)
    assert train.memory.arguments >= 4 * total // len(devices)  # at least each device's share of the f32 params


@pytest.mark.slow  # 25 s
def test_multislice_train_step_compiles():
    """Two v5p:2x2x1 slices: the data axis spans the slices (over the data-center network), experts stay inside."""
    devices = tpu_topology(TOPOLOGY, num_slices=2)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    model = ling_jax.LingForCausalLM(ling_jax.get_config("tiny"), dtype=jnp.bfloat16)
    mesh = make_mesh({"data": 2, "expert": 4}, devices=devices)
    assert {d.slice_index for d in mesh.devices[0].flat} == {0}  # one slice per data index
    train = compile_train_step(model, optax.adamw(1e-3), LossConfig(), mesh, batch_size=8, seq_len=256)
    assert train.memory.aliased > 0


def test_pallas_gmm_and_tgmm_forward_and_backward_compile(devices):
    mesh = make_mesh({}, devices=devices[:1])
    m, k, n, groups = 512, 256, 384, 8
    with use_mesh(mesh):
        sh = NamedSharding(mesh, PartitionSpec())
        lhs = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=sh)
        rhs = jax.ShapeDtypeStruct((groups, k, n), jnp.bfloat16, sharding=sh)
        sizes = jax.ShapeDtypeStruct((groups,), jnp.int32, sharding=sh)

        def loss(lhs, rhs, sizes):
            return jnp.sum(pallas_kernels.gmm(lhs, rhs, sizes).astype(jnp.float32) ** 2)

        compiled = compile_abstract(jax.grad(loss, argnums=(0, 1)), lhs, rhs, sizes)
        text = compiled.as_text()
        assert text.count("tpu_custom_call") >= 3  # gmm forward, gmm (transposed rhs) and tgmm backward
        dy = jax.ShapeDtypeStruct((m, n), jnp.bfloat16, sharding=sh)
        tgmm = compile_abstract(functools.partial(pallas_kernels.tgmm, num_groups=groups), lhs, dy, sizes)
        assert "tpu_custom_call" in tgmm.as_text()


@pytest.mark.slow
def test_ling_coder_lite_train_and_decode_steps_compile_with_splash_and_expert_parallelism(devices):
    """Full-width Ling-Coder-lite (one MoE layer: the scanned layer body is what compiles) with splash
    attention, the Pallas grouped matmul and the ragged all-to-all over expert=4; the 28-layer model at pod
    scale is the slow test below."""
    model = _lite(1)
    mesh = make_mesh({"expert": 4}, devices=devices)
    train = compile_train_step(model, optax.adamw(1e-4), LossConfig(accumulation_steps=2), mesh,
                               batch_size=8, seq_len=2048)
    decode = compile_decode_step(model, mesh, batch_size=4, max_len=2048)
    hbm = 95 * 2**30
    assert 0 < train.memory.peak < hbm and 0 < decode.memory.peak < hbm


def test_train_py_compile_only_for_a_topology(tmp_path, capsys):
    import train
    from configs import default

    cfg = default.get_config()
    cfg.compute_dtype, cfg.batch_size, cfg.seq_len = "bfloat16", 8, 256
    cfg.mesh.data, cfg.mesh.expert = 1, 4
    cfg.compile_only, cfg.compile_topology = True, TOPOLOGY
    workdir = tmp_path / "w"
    loss = train.run(cfg, str(workdir))
    out = capsys.readouterr().out
    assert loss != loss  # NaN: nothing was trained
    assert f"train_step compiled for {TOPOLOGY} (4 x TPU v5)" in out and "fits in 95.0 GiB HBM" in out
    assert not workdir.exists()  # nothing written


@pytest.mark.slow
def test_ling_coder_lite_pretrain_recipe_fits_v5p_64(capsys):
    """The 28-layer model with the recipe of configs/pretrain_ling_coder_lite.py on v5p-64 (32 chips): the
    compiler's peak fits the 95 GiB of HBM, and the planner's estimate is within the factor docs/scaling.md states."""
    from ling_jax.cli import plan as plan_cli

    args = ["--model", "ling_coder_lite", "--mesh", "fsdp=4,expert=8", "--batch-tokens", str(16 * 2**20),
            "--seq-len", "4096", "--accumulation-steps", "16", "--remat", "full", "--compile", "v5p:2x4x4"]
    assert plan_cli.main(args) == 0
    out = capsys.readouterr().out
    peak = re.search(r"train_step peak ([\d.]+) GiB of 95.0 GiB HBM: fits", out)
    ratio = re.search(r"planner estimate [\d.]+ GiB = ([\d.]+) x the compiler's peak", out)
    assert peak is not None and ratio is not None, out[-2000:]
    assert 60 < float(peak[1]) < 95
    assert 0.6 < float(ratio[1]) < 1.0
