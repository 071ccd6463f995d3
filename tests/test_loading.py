"""`ling_jax.io.loading`: what a path holds (HF, converted, train.py step or workdir), and `from_pretrained`."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

import ling_jax
from ling_jax.config import ConfigError
from ling_jax.io import loading
from ling_jax.io.convert import convert_hf_to_orbax
from ling_jax.io.hf_names import CheckpointError, CheckpointNotFoundError
from ling_jax.io.loading import CheckpointKind
from ling_jax.io.safetensors import SafetensorsCheckpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_dir) -> pathlib.Path:
    return pathlib.Path(convert_hf_to_orbax(fixture_dir, tmp_path_factory.mktemp("loading") / "converted"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fixture_dir, tiny) -> pathlib.Path:
    """A train.py workdir with checkpoints at steps 3 and 12 (12 holds the fixture's weights, 3 zeros)."""
    work = tmp_path_factory.mktemp("loading") / "run"
    _, params = tiny
    config = json.loads((fixture_dir / "config.json").read_text())
    manager = ocp.CheckpointManager(work / "checkpoints", item_names=("state", "data", "model_config"))
    for step, p in ((3, jax.tree.map(jnp.zeros_like, params)), (12, params)):
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": step, "params": p, "opt_state": {"mu": p}}),
            data=ocp.args.JsonSave({"position": step}), model_config=ocp.args.JsonSave(config)))
    manager.wait_until_finished()
    manager.close()
    return work


def _config_item(step: pathlib.Path, fixture_dir) -> pathlib.Path:
    """A fake train.py step: only its `model_config` item."""
    (step / "model_config").mkdir(parents=True)
    shutil.copy(fixture_dir / "config.json", step / "model_config" / "metadata")
    return step


def _assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_from_pretrained_on_the_hf_fixture_matches_golden(fixture_dir, golden):
    model, params = ling_jax.from_pretrained(fixture_dir, param_dtype=jnp.bfloat16)
    assert model.dtype == jnp.float32 and params["moe_layers"]["mlp"]["gate_proj"].dtype == jnp.bfloat16
    assert params["moe_layers"]["mlp"]["gate_proj"].shape == (2, 8, 64, 32)
    logits = model.apply({"params": params}, jnp.asarray(golden["forward_input_ids"]))
    np.testing.assert_allclose(logits, golden["forward_logits"], atol=2e-4)  # bf16 weights are exact in bf16


def test_from_pretrained_single_file_checkpoint(tmp_path, fixture_dir, golden):
    shutil.copy(fixture_dir / "config.json", tmp_path / "config.json")
    tensors = SafetensorsCheckpoint(str(fixture_dir))
    save_file({k: tensors[k].astype(np.float32) for k in tensors}, str(tmp_path / "model.safetensors"))
    model, params = ling_jax.from_pretrained(str(tmp_path))
    logits = model.apply({"params": params}, jnp.asarray(golden["forward_input_ids"]))
    np.testing.assert_allclose(logits, golden["forward_logits"], atol=2e-4)


def test_from_pretrained_on_a_converted_dir_equals_the_hf_dir(converted, tiny, golden):
    model, params = ling_jax.from_pretrained(converted)
    _assert_same_params(params, tiny[1])
    logits = model.apply({"params": params}, jnp.asarray(golden["forward_input_ids"]))
    np.testing.assert_allclose(logits, golden["forward_logits"], atol=2e-4)


def test_from_pretrained_on_a_workdir_takes_the_latest_step(workdir, tiny):
    _, from_work = ling_jax.from_pretrained(workdir, dtype=jnp.bfloat16)
    _, from_step = ling_jax.from_pretrained(workdir / "checkpoints" / "12", dtype=jnp.bfloat16)
    _assert_same_params(from_work, from_step)
    _assert_same_params(from_work, jax.tree.map(lambda x: x.astype(jnp.bfloat16), tiny[1]))
    _, first = ling_jax.from_pretrained(workdir / "checkpoints" / "3" / "state")  # the step's state/ item
    assert float(jnp.abs(first["embed"]["embedding"]).max()) == 0.0


def test_resolve_checkpoint_kinds(fixture_dir, converted, workdir):
    hf = loading.resolve_checkpoint(fixture_dir)
    assert (hf.kind, hf.path, hf.config_file) == (CheckpointKind.HF, str(fixture_dir), str(fixture_dir / "config.json"))
    assert loading.resolve_checkpoint(converted).kind is CheckpointKind.CONVERTED
    step = workdir / "checkpoints" / "12"
    train = loading.resolve_checkpoint(workdir)
    assert (train.kind, train.path, train.config_file) == (
        CheckpointKind.TRAIN_STEP, str(step), str(step / "model_config" / "metadata"))
    assert train.config() == hf.config() == ling_jax.LingConfig.from_json_file(str(fixture_dir / "config.json"))


def test_tokenizer_dir_of_a_train_step_is_its_workdir(tmp_path, fixture_dir, converted):
    step = _config_item(tmp_path / "run" / "checkpoints" / "5", fixture_dir)
    ckpt = loading.resolve_checkpoint(tmp_path / "run")
    assert ckpt.workdir == str(tmp_path / "run") and ckpt.tokenizer_dir == str(step)  # no tokenizer anywhere
    tok = tmp_path / "tok.model"
    tok.write_text("sp")
    assert loading.copy_tokenizer_files(tok, tmp_path / "run") == ["tokenizer.model"]
    assert ckpt.tokenizer_dir == str(tmp_path / "run")
    (step / "tokenizer.json").write_text("{}")  # a step's own tokenizer wins
    assert ckpt.tokenizer_dir == str(step)
    assert loading.resolve_checkpoint(converted).tokenizer_dir == str(converted)
    assert loading.resolve_checkpoint(converted).workdir is None


def test_resolve_init_path_of_a_workdir_is_its_latest_step(tmp_path, fixture_dir):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (3, 12):  # 12 > 3 although "12" < "3"
        _config_item(ckpts / str(step), fixture_dir)
    (ckpts / "20.orbax-checkpoint-tmp-1700000000").mkdir()  # a save still in progress
    (ckpts / "30").write_text("not a directory")
    assert loading.resolve_init_path(str(tmp_path / "run")) == str(ckpts / "12")
    assert loading.resolve_init_path(str(ckpts / "3")) == str(ckpts / "3")
    assert loading.init_config(str(tmp_path / "run")).num_experts == 8


def test_resolve_init_path_errors_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointNotFoundError, match=f"{missing} does not exist: point config.init_from at a "
                                                      "Hugging Face directory") as info:
        loading.resolve_init_path(str(missing))
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ling_jax.CheckpointError)
    (tmp_path / "run" / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
    with pytest.raises(CheckpointNotFoundError, match=r"run is a train.py workdir without a finished checkpoint"):
        loading.resolve_init_path(str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"empty has no config.json, no checkpoints/ and no "
                                                      r"model_config/ item: point config.init_from at"):
        loading.init_config(str(tmp_path / "empty"))
    with pytest.raises(CheckpointNotFoundError, match=r"does not exist: point the path at"):
        ling_jax.from_pretrained(str(missing))


def test_load_init_params_checks_the_config(workdir, converted, fixture_dir, tiny):
    config = loading.init_config(str(workdir))
    params = loading.load_init_params(str(workdir), config, jnp.float32)
    _assert_same_params(params, tiny[1])
    from_converted = loading.load_init_params(str(converted), config, jnp.bfloat16)
    assert from_converted["embed"]["embedding"].dtype == jnp.bfloat16
    bigger = config.replace(num_experts=16)
    with pytest.raises(CheckpointError, match=r"gate_proj: expected shape \(2, 16, 64, 32\), found \(2, 8, 64, 32\)"):
        loading.load_init_params(str(workdir), bigger, jnp.float32)
    with pytest.raises(CheckpointError, match=r"missing model.layers.1.mlp.experts.8.gate_proj.weight"):
        loading.load_init_params(str(fixture_dir), bigger, jnp.float32)


def test_find_config_walks_up_two_levels(tmp_path, fixture_dir):
    shutil.copy(fixture_dir / "config.json", tmp_path / "config.json")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert loading.find_config(deep) == str(tmp_path / "config.json")
    (deep / "c").mkdir()
    with pytest.raises(CheckpointNotFoundError, match=r"no config.json in .*/a/b/c or its parents: pass .* --config"):
        loading.find_config(deep / "c")
    step = _config_item(tmp_path / "a" / "7", fixture_dir)
    (step / "state").mkdir()
    assert loading.find_config(step / "state") == str(step / "model_config" / "metadata")
    assert loading.find_config(deep / "c", config_path=tmp_path) == str(tmp_path / "config.json")
    with pytest.raises(CheckpointNotFoundError, match=r"config file .*other.json does not exist"):
        loading.find_config(deep, config_path=tmp_path / "other.json")


def test_bad_config_files_are_named(tmp_path, fixture_dir):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=rf"{hf}/config.json is not valid JSON .*: fix it or re-download"):
        loading.load_config(hf)
    (hf / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"holds a JSON list, not an object"):
        loading.load_config(hf)
    cfg = json.loads((fixture_dir / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(cfg, model_type="qwen2_moe")))
    with pytest.raises(ConfigError, match=rf"{hf}/config.json: model_type 'qwen2_moe' is not supported; "
                                          "supported: bailing_moe"):
        ling_jax.from_pretrained(hf)
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointNotFoundError, match=r"has neither model.safetensors.index.json nor model.s"):
        ling_jax.from_pretrained(hf)
