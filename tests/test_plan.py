"""`ling_jax.train.planner`, `python -m ling_jax.cli.plan`: per-device bytes against arithmetic, bad input."""

from __future__ import annotations

import json
import math
import time

import jax
import pytest

from ling_jax.cli import plan as plan_lib
from ling_jax.cli.plan import load_config, parse_mesh
from ling_jax.config import DType, Remat
from ling_jax.model.params import count_params
from ling_jax.train import planner
from ling_jax.train.planner import PlanError
from ling_jax.zoo import get_config

LITE_MESH = "data=4,fsdp=4,expert=8"
M = 1 << 20  # tokens


def plan(model: str, mesh: dict[str, int], **kw) -> planner.Plan:
    """The plan of a zoo preset or config.json path, as the command line makes it."""
    return planner.plan(load_config(model), mesh, name=model, **kw)


@pytest.fixture(scope="module")
def lite():
    return plan("ling_coder_lite", parse_mesh(LITE_MESH), batch_tokens=4 * M, seq_len=4096, accumulation_steps=4)


def _leaf(p, path):
    return next(lp for lp in p.leaves if lp.path == path)


def test_parse_mesh():
    assert parse_mesh("data=4,fsdp=4,expert=8") == dict(data=4, fsdp=4, expert=8, tensor=1)
    assert parse_mesh(" expert=8 , fsdp=-1 ", devices=32) == dict(data=1, fsdp=4, expert=8, tensor=1)


@pytest.mark.parametrize("text, devices, message", [
    ("data4", None, "is not AXIS=SIZE"),
    ("data=4,pipe=2", None, "unknown mesh axis 'pipe'"),
    ("data=4,data=2", None, "given twice"),
    ("data=four", None, "must be an integer"),
    ("data=0", None, "must be >= 1"),
    ("", None, "empty mesh"),
    ("data=4,fsdp=4,expert=8", 64, "has 128 devices, but --devices is 64"),
    ("data=-1,fsdp=-1", 8, "at most one"),
    ("data=-1,expert=8", 12, "needs --devices divisible by 8"),
])
def test_parse_mesh_errors(text, devices, message):
    with pytest.raises(PlanError, match=message):
        parse_mesh(text, devices)


def test_lite_leaves_are_total_bytes_over_the_shard_factor(lite):
    experts = _leaf(lite, "moe_layers/mlp/gate_proj")  # [L, E, D, F]: E over expert (8), D over fsdp (4)
    assert experts.shape == (28, 64, 2048, 1408) and experts.spec[:3] == (None, "expert", "fsdp")
    assert experts.shard_shape == (28, 8, 512, 1408)
    assert experts.bytes_per_device == 28 * 64 * 2048 * 1408 * 4 // 32
    embed = _leaf(lite, "embed/embedding")  # [V, D]: D over fsdp
    assert embed.bytes_per_device == 126464 * 2048 * 4 // 4
    q = _leaf(lite, "moe_layers/attention/q_proj")  # [L, D, N, H]
    assert q.bytes_per_device == 28 * 2048 * 16 * 128 * 4 // 4
    assert _leaf(lite, "norm/scale").bytes_per_device == 2048 * 4  # replicated


def test_lite_totals_from_independent_counts(lite):
    total, _ = count_params(get_config("ling_coder_lite"))
    routed = 28 * 3 * 64 * 2048 * 1408  # sharded 32 ways (expert x fsdp)
    norms = 28 * 2 * 2048 + 2048  # replicated
    assert lite.params == 4 * (routed // 32 + (total - routed - norms) // 4 + norms)
    assert lite.grads == 2 * lite.params  # accumulator + one microbatch
    assert 0 <= lite.opt_state - 2 * lite.params < 64  # Adam mu and nu in float32, plus step counters
    assert lite.tokens_per_device == 4 * M // 4 // 128 == 8192
    assert lite.total == lite.params + lite.grads + lite.opt_state + lite.activations
    assert lite.fits and lite.hbm == 95 * 2**30


def test_lite_all_to_all_bytes(lite):
    X, k, D = 8192, 6, 2048
    per_transfer = X * k * D * 2  # bf16 rows
    expected = 4 * int(5 * per_transfer * 7 / 8)  # dispatch+combine fwd+bwd, dispatch recomputed; 4 microbatches
    assert lite.a2a_per_layer["expected"] == expected
    assert lite.a2a_per_layer["padded"] == 4 * 5 * per_transfer * 7  # e times the expected volume
    assert lite.comm["expert_all_to_all"] == 28 * expected


def test_lite_fsdp_gather_bytes(lite):
    # Everything but the norm scales is split 4 ways over fsdp: each bf16 all-gather receives 3 shards.
    sharded = sum(math.prod(lp.shard_shape) for lp in lite.leaves if "fsdp" in lp.spec)
    assert lite.comm["fsdp_all_gather"] == 4 * 2 * 3 * sharded * 2
    assert lite.comm["grad_reduce_scatter"] == 4 * 3 * sharded * 4


def test_remat_orders_activations():
    kw = dict(batch_tokens=M, seq_len=4096)
    acts = {r: plan("ling_coder_lite", parse_mesh("fsdp=4,expert=8"), remat=r, **kw).activation_parts
            for r in Remat}
    saved = {r: a["saved by the layers"] for r, a in acts.items()}
    assert saved[Remat.FULL] < saved[Remat.DOTS] < saved[Remat.NONE]
    X = M // 32
    assert saved[Remat.FULL] == 28 * 2048 * 2 * X  # the layer inputs, bf16
    assert acts[Remat.NONE]["backward working set"] == 0


def test_tensor_axis_splits_heads():
    p = plan("tiny", parse_mesh("data=2,tensor=2"), batch_tokens=4 * 128, seq_len=128,
             param_dtype=DType.BFLOAT16)
    q = _leaf(p, "moe_layers/attention/q_proj")  # [2, 64, 4, 16]
    assert q.shard_shape == (2, 64, 2, 16) and q.bytes_per_device == 2 * 64 * 2 * 16 * 2
    assert p.comm["tensor_all_reduce"] > 0


def test_ling_plus_plans_in_seconds():
    t = time.perf_counter()
    p = plan("ling_plus", parse_mesh("fsdp=32,expert=8"), batch_tokens=16 * M, seq_len=4096, accumulation_steps=8)
    assert time.perf_counter() - t < 60
    experts = _leaf(p, "moe_layers/mlp/down_proj")  # [88, 64, 3072, 5376]
    assert experts.bytes_per_device == 88 * 64 * 3072 * 5376 * 4 // 256
    total, _ = count_params(get_config("ling_plus"))
    assert 290e9 < total < 291e9 and p.params > total * 4 / 256  # non-expert weights are split 32 ways only
    assert p.fits and 0 < p.mfu_bounds["no_overlap"] < p.mfu_bounds["full_overlap"] <= 1


@pytest.mark.parametrize("model, mesh, kw, message", [
    ("ling_coder_lite", "fsdp=4,expert=12", {}, r"expert axis \(12\) must divide num_experts \(64\)"),
    ("ling_coder_lite", "expert=8,tensor=8", {}, r"tensor axis \(8\) must divide the kv heads \(4\)"),
    ("ling_plus", "fsdp=4,tensor=16", {}, r"tensor axis \(16\) must divide the kv heads \(8\)"),
    ("ling_coder_lite", "data=4,fsdp=4,expert=8", dict(batch_tokens=64 * 4096),
     "64 sequences must split into 1 microbatch.* not divisible by 128"),
    ("ling_coder_lite", "data=4", dict(batch_tokens=4097), "positive multiple of --seq-len"),
    ("ling_coder_lite", "fsdp=4,expert=8", dict(accumulation_steps=3), "not divisible by 96"),
    ("ling_ultra", "data=4", {}, "neither a zoo preset"),
    ("tiny", "fsdp=3", dict(batch_tokens=6 * 4096), r"hidden_size \(64\).*not divisible by mesh axis 'fsdp'"),
])
def test_bad_input_fails_before_tracing(monkeypatch, model, mesh, kw, message):
    def no_tracing(*args, **kwargs):
        raise AssertionError("traced before validating")

    monkeypatch.setattr(jax, "eval_shape", no_tracing)
    args = dict(batch_tokens=M, seq_len=4096) | kw
    with pytest.raises(PlanError, match=message):
        plan(model, parse_mesh(mesh), **args)


def test_config_json_model(tmp_path):
    cfg = get_config("tiny").to_hf_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = plan(str(tmp_path), parse_mesh("expert=4"), batch_tokens=8 * 64, seq_len=64)
    assert _leaf(p, "moe_layers/mlp/up_proj").shard_shape == (2, 2, 64, 32)


def test_cli(capsys):
    assert plan_lib.main(["--model", "tiny", "--mesh", "data=2,expert=4", "--batch-tokens", "1024",
                          "--seq-len", "128", "--remat", "dots", "--hbm-gib", "16"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=2,fsdp=1,expert=4,tensor=1 (8 devices)" in out and "of 16.0 GiB HBM: fits" in out
    assert out.startswith("assumes: remat dots (--remat), params float32 / compute bfloat16 / Adam mu float32 "
                          "(--param-dtype, --compute-dtype, --mu-dtype), chip v5p with 16.0 GiB HBM")
    assert plan_lib.main(["--model", "tiny", "--mesh", "data=2,expert=4", "--batch-tokens", "1024",
                          "--seq-len", "128"]) == 0
    assert capsys.readouterr().out.startswith("assumes: remat none (--remat)")  # train.py's default
    assert plan_lib.main(["--model", "tiny", "--mesh", "data=2,expert=3", "--batch-tokens", "1024",
                          "--seq-len", "128"]) == 2
    assert "error: the expert axis (3) must divide num_experts (8)" in capsys.readouterr().err
