"""`convert_weights.py` (`ling_jax.cli.convert` over `ling_jax.io.convert`): streaming Hugging Face <-> Orbax
conversion, bit-exact, atomic, with clear errors."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

import ling_jax
from ling_jax.cli import convert as cli
from ling_jax.io import convert
from ling_jax.io import orbax_params as checkpoint
from ling_jax.io.hf_names import tensor_specs
from ling_jax.io.safetensors import INDEX_FILE, SafetensorsCheckpoint
from ling_jax.model.params import abstract_params

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "convert_weights.py"
_spec = importlib.util.spec_from_file_location("convert_weights", SCRIPT)
cw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cw)


def _run(capsys, *argv: str) -> tuple[int, str]:
    """Runs the CLI in-process; returns (exit status, stderr)."""
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _tensors(directory) -> dict[str, np.ndarray]:
    ckpt = SafetensorsCheckpoint(str(directory))
    return {name: ckpt[name] for name in ckpt}


def _assert_same_tensors(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name, x in ta.items():
        y = tb[name]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert x.tobytes() == y.tobytes(), name


def _config(fixture_dir, **changes) -> dict:
    return dict(json.loads((fixture_dir / "config.json").read_text()), **changes)


def _synthetic(dst: pathlib.Path, cfg_dict: dict, *, dtype=np.float32, shards: int = 1, seed: int = 0) -> pathlib.Path:
    """A checkpoint with random weights, single-file or in `shards` shards plus an index.

    The weights are a random parameter tree (NumPy, shaped by `abstract_params`, so no
    compilation) written through `to_hf_state_dict`, as `init_params` would be.
    """
    cfg = ling_jax.LingConfig.from_hf_dict(cfg_dict)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), abstract_params(cfg))
    tensors = ling_jax.to_hf_state_dict(params, cfg, dtype=dtype)
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(dict(cfg_dict, torch_dtype=np.dtype(dtype).name), indent=2))
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    names, weight_map = list(tensors), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return dst


def _round_trip(capsys, src, tmp_path, *extra_h2j: str) -> tuple[pathlib.Path, pathlib.Path]:
    jx, hf = tmp_path / "jax", tmp_path / "hf"
    assert _run(capsys, "hf-to-jax", "--hf-dir", src, "--out", jx, *extra_h2j)[0] == 0
    assert _run(capsys, "jax-to-hf", "--ckpt", jx, "--out", hf)[0] == 0
    return jx, hf


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_dir) -> pathlib.Path:
    out = tmp_path_factory.mktemp("converted") / "ling-tiny-a"
    convert.convert_hf_to_orbax(fixture_dir, out)
    return out


def test_round_trip_of_the_fixture_is_bit_exact(capsys, converted, fixture_dir, tmp_path):
    out = tmp_path / "hf"
    code, err = _run(capsys, "jax-to-hf", "--ckpt", converted, "--out", out)
    assert code == 0, err
    _assert_same_tensors(fixture_dir, out)
    assert json.loads((out / "config.json").read_text()) == json.loads((fixture_dir / "config.json").read_text())
    assert (json.loads((out / "generation_config.json").read_text())
            == json.loads((fixture_dir / "generation_config.json").read_text()))
    index = json.loads((out / INDEX_FILE).read_text())
    original = json.loads((fixture_dir / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == original["metadata"]["total_size"]
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left


def test_converted_directory_layout_and_orbax_restore(converted, fixture_dir):
    assert (converted / "config.json").read_bytes() == (fixture_dir / "config.json").read_bytes()
    assert (converted / "generation_config.json").exists()
    assert json.loads((converted / checkpoint.MARKER).read_text())["dtype"] == "bfloat16"
    cfg = ling_jax.LingConfig.from_hf_dict(_config(fixture_dir))
    expected = ling_jax.from_hf_state_dict(_tensors(fixture_dir), cfg)
    plain = ocp.PyTreeCheckpointer().restore(converted / "params")  # a standard Orbax checkpoint
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(plain), strict=True):
        assert a.dtype == b.dtype and a.tobytes() == np.asarray(b).tobytes()
    meta = ocp.PyTreeCheckpointHandler().metadata(converted / "params").tree
    assert meta["moe_layers"]["mlp"]["gate_proj"].storage.chunk_shape == (1, 1, 64, 32)  # one expert per chunk
    assert meta["dense_layers"]["attention"]["q_proj"].storage.chunk_shape == (1, 64, 4, 16)
    part = checkpoint.restore_params(converted, keys=[("moe_layers", "mlp", "router")], dtype=jnp.float32)
    assert list(part) == ["moe_layers"] and part["moe_layers"]["mlp"]["router"].dtype == jnp.float32
    np.testing.assert_array_equal(part["moe_layers"]["mlp"]["router"], expected["moe_layers"]["mlp"]["router"])


def test_float32_storage_of_a_bfloat16_checkpoint(capsys, fixture_dir, tmp_path):
    jx, hf = _round_trip(capsys, fixture_dir, tmp_path, "--dtype", "float32")
    assert json.loads((jx / checkpoint.MARKER).read_text())["dtype"] == "float32"
    for name, x in _tensors(hf).items():
        assert x.dtype == np.float32, name
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "float32"
    back = tmp_path / "hf_bf16"
    assert _run(capsys, "jax-to-hf", "--ckpt", jx, "--out", back, "--dtype", "bfloat16")[0] == 0
    _assert_same_tensors(fixture_dir, back)  # bf16 -> f32 -> bf16 is exact
    assert json.loads((back / "config.json").read_text()) == _config(fixture_dir)


def test_float32_single_file_checkpoint_and_bfloat16_storage(capsys, fixture_dir, tmp_path):
    src = _synthetic(tmp_path / "src", _config(fixture_dir), dtype=np.float32)
    _, hf = _round_trip(capsys, src, tmp_path)
    _assert_same_tensors(src, hf)
    _, hf16 = _round_trip(capsys, src, tmp_path / "bf16", "--dtype", "bfloat16")
    ref = _tensors(src)
    for name, x in _tensors(hf16).items():
        assert x.dtype == ml_dtypes.bfloat16
        assert x.tobytes() == ref[name].astype(ml_dtypes.bfloat16).tobytes(), name
    assert json.loads((hf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sharded_input_and_sharded_output(capsys, monkeypatch, fixture_dir, tmp_path):
    src = _synthetic(tmp_path / "src", _config(fixture_dir), dtype=ml_dtypes.bfloat16, shards=3, seed=1)
    monkeypatch.chdir(tmp_path)  # relative paths work too
    assert _run(capsys, "hf-to-jax", "--hf-dir", "src", "--out", "jax")[0] == 0
    out = tmp_path / "hf"
    assert _run(capsys, "jax-to-hf", "--ckpt", "jax", "--out", "hf", "--max-shard-size", "100KB")[0] == 0
    _assert_same_tensors(src, out)
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 6 and files[0] == "model-00001-of-00006.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert all((out / f).stat().st_size <= 100_000 + 20_000 for f in files)  # + header
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in _tensors(src).values())


@pytest.mark.parametrize("changes", [{"tie_word_embeddings": True}, {"first_k_dense_replace": 0}],
                         ids=["tied-embeddings", "no-dense-layers"])
def test_config_variants_round_trip(capsys, fixture_dir, tmp_path, changes):
    src = _synthetic(tmp_path / "src", _config(fixture_dir, **changes), dtype=ml_dtypes.bfloat16, seed=2)
    jx, hf = _round_trip(capsys, src, tmp_path)
    _assert_same_tensors(src, hf)
    assert json.loads((hf / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    _, from_hf = ling_jax.from_pretrained(src)
    _, from_jax = ling_jax.from_pretrained(jx)
    assert jax.tree.structure(from_hf) == jax.tree.structure(from_jax)
    for a, b in zip(jax.tree.leaves(from_hf), jax.tree.leaves(from_jax), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ("lm_head" in from_jax) != changes.get("tie_word_embeddings", False)
    assert ("dense_layers" in from_jax) == ("first_k_dense_replace" not in changes)


def test_training_checkpoint_with_params_key(capsys, converted, fixture_dir, tmp_path):
    params = checkpoint.restore_params(converted)
    state = tmp_path / "run" / "100" / "state"
    with ocp.StandardCheckpointer() as saver:
        saver.save(state, {"params": params, "step": 100})
        saver.wait_until_finished()
    out = tmp_path / "hf"
    code, err = _run(capsys, "jax-to-hf", "--ckpt", state, "--params-key", "params",
                     "--config", fixture_dir / "config.json", "--out", out)
    assert code == 0, err
    _assert_same_tensors(fixture_dir, out)
    code, err = _run(capsys, "jax-to-hf", "--ckpt", state, "--params-key", "opt_state",
                     "--config", fixture_dir, "--out", tmp_path / "x")
    assert code == 2 and "no key 'opt_state' (keys there: params, step)" in err and "--params-key" in err
    code, err = _run(capsys, "jax-to-hf", "--ckpt", state, "--out", tmp_path / "x")
    assert code == 2 and "no config.json" in err and "--config" in err
    code, err = _run(capsys, "jax-to-hf", "--ckpt", fixture_dir, "--out", tmp_path / "x")
    assert code == 2 and "convert it with hf-to-jax first" in err
    small = _config(fixture_dir, num_experts=4)
    (tmp_path / "small.json").write_text(json.dumps(small))
    code, err = _run(capsys, "jax-to-hf", "--ckpt", state, "--config", tmp_path / "small.json", "--out", tmp_path / "x")
    assert code == 2 and "moe_layers/mlp/gate_proj: expected shape (2, 4, 64, 32), found (2, 8, 64, 32)" in err
    (tmp_path / "run" / "100" / "other" / "_METADATA").parent.mkdir()
    (tmp_path / "run" / "100" / "other" / "_METADATA").write_text("{}")
    code, err = _run(capsys, "jax-to-hf", "--ckpt", state.parent, "--config", fixture_dir, "--out", tmp_path / "x")
    assert code == 2 and "pass one of those" in err and str(state) in err


def test_checkpoint_manager_step_directory_needs_no_flags(capsys, converted, fixture_dir, tmp_path):
    params = checkpoint.restore_params(converted, dtype=jnp.float32)  # f32 master weights, as in training
    manager = ocp.CheckpointManager(tmp_path / "checkpoints", item_names=("state", "model_config"))
    manager.save(7, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": 7, "params": params, "opt_state": {"mu": params}}),
        model_config=ocp.args.JsonSave(_config(fixture_dir))))
    manager.wait_until_finished()
    manager.close()
    (tmp_path / "tokenizer.json").write_text('{"from": "the run"}')  # train.py keeps the run's tokenizer here
    out = tmp_path / "hf"
    code, err = _run(capsys, "jax-to-hf", "--ckpt", tmp_path / "checkpoints" / "7", "--out", out,
                     "--dtype", "bfloat16")
    assert code == 0, err
    _assert_same_tensors(fixture_dir, out)  # bf16 -> f32 -> bf16 is exact
    assert (out / "tokenizer.json").read_text() == '{"from": "the run"}'  # the export is usable as it is
    code, err = _run(capsys, "jax-to-hf", "--ckpt", tmp_path, "--out", tmp_path / "hf3", "--dtype", "bfloat16")
    assert code == 0, err
    _assert_same_tensors(out, tmp_path / "hf3")
    # A workdir as --reference-dir brings its tokenizer too (here to an export of a converted directory).
    code, err = _run(capsys, "jax-to-hf", "--ckpt", converted, "--out", tmp_path / "hf2", "--reference-dir", tmp_path)
    assert code == 0, err
    assert (tmp_path / "hf2" / "tokenizer.json").read_text() == '{"from": "the run"}'
    code, err = _run(capsys, "jax-to-hf", "--ckpt", converted, "--out", tmp_path / "x", "--reference-dir",
                     tmp_path / "checkpoints")
    assert code == 2 and "--reference-dir" in err and "train.py workdir" in err


def test_aux_files_and_reference_dir(capsys, fixture_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fixture_dir, src)
    for name, text in [("tokenizer.json", "{}"), ("tokenizer_config.json", "{}"), ("special_tokens_map.json", "{}"),
                       ("modeling_bailing_moe.py", "# model code"), ("vocab.tiktoken", "x")]:
        (src / name).write_text(text)
    jx = tmp_path / "jax"
    assert _run(capsys, "hf-to-jax", "--hf-dir", src, "--out", jx)[0] == 0
    assert {"tokenizer.json", "modeling_bailing_moe.py", "vocab.tiktoken"} <= {p.name for p in jx.iterdir()}
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(fixture_dir / "config.json", ref)
    (ref / "tokenizer.json").write_text('{"from": "reference"}')
    (ref / "configuration_bailing_moe.py").write_text("# config code")
    out = tmp_path / "hf"
    assert _run(capsys, "jax-to-hf", "--ckpt", jx, "--out", out, "--reference-dir", ref)[0] == 0
    assert (out / "tokenizer.json").read_text() == '{"from": "reference"}'
    assert {"configuration_bailing_moe.py", "modeling_bailing_moe.py", "special_tokens_map.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}


def _copy_fixture(fixture_dir, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(fixture_dir, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _bad_input(capsys, src: pathlib.Path, tmp_path: pathlib.Path) -> str:
    out = tmp_path / "out"
    code, err = _run(capsys, "hf-to-jax", "--hf-dir", src, "--out", out)
    assert code == 2 and "Traceback" not in err and "error:" in err
    assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))
    return err


def test_missing_shard(capsys, fixture_dir, tmp_path):
    src = _copy_fixture(fixture_dir, tmp_path / "src")
    (src / "model-00003-of-00004.safetensors").unlink()
    err = _bad_input(capsys, src, tmp_path)
    assert "model-00003-of-00004.safetensors" in err and "missing" in err and "re-download" in err


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_truncated_or_corrupt_safetensors(capsys, fixture_dir, tmp_path, damage):
    src = _copy_fixture(fixture_dir, tmp_path / "src")
    shard = src / "model-00002-of-00004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000] if damage == "truncated" else b"\x10\x00\x00\x00garbage" + data[12:])
    err = _bad_input(capsys, src, tmp_path)
    assert "model-00002-of-00004.safetensors is not a readable safetensors file" in err and "re-download" in err


def _edited(fixture_dir, dst: pathlib.Path, edit) -> pathlib.Path:
    tensors = _tensors(fixture_dir)
    edit(tensors)
    dst.mkdir()
    shutil.copy(fixture_dir / "config.json", dst)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_and_misshapen_tensors_are_named(capsys, fixture_dir, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.experts.3.up_proj.weight"]
        t["model.layers.2.mlp.gate.weight"] = np.zeros((9, 64), ml_dtypes.bfloat16)

    err = _bad_input(capsys, _edited(fixture_dir, tmp_path / "src", edit), tmp_path)
    assert "missing model.layers.1.mlp.experts.3.up_proj.weight (expected shape (32, 64))" in err
    assert "model.layers.2.mlp.gate.weight: expected shape (8, 64), found (9, 64)" in err


def test_unexpected_tensor_is_named(capsys, fixture_dir, tmp_path):
    def edit(t):
        t["model.layers.3.mlp.gate.weight"] = np.zeros((8, 64), ml_dtypes.bfloat16)

    err = _bad_input(capsys, _edited(fixture_dir, tmp_path / "src", edit), tmp_path)
    assert "unexpected tensor model.layers.3.mlp.gate.weight (shape (8, 64))" in err


def test_existing_output_needs_overwrite(capsys, converted, fixture_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, err = _run(capsys, "hf-to-jax", "--hf-dir", fixture_dir, "--out", out)
    assert code == 2 and "already exists" in err and "--overwrite" in err and (out / "old.txt").exists()
    code, err = _run(capsys, "jax-to-hf", "--ckpt", converted, "--out", out)
    assert code == 2 and "already exists" in err
    assert _run(capsys, "hf-to-jax", "--hf-dir", fixture_dir, "--out", out, "--overwrite")[0] == 0
    assert not (out / "old.txt").exists() and checkpoint.is_converted_checkpoint(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    code, err = _run(capsys, "hf-to-jax", "--hf-dir", fixture_dir, "--out", fixture_dir, "--overwrite")
    assert code == 2 and "would replace the input" in err


def test_failure_midway_leaves_nothing(capsys, monkeypatch, converted, fixture_dir, tmp_path):
    reads = []

    def failing_read(self, name):
        reads.append(name)
        if len(reads) > 20:
            raise OSError("disk went away")
        return original(self, name)

    original = SafetensorsCheckpoint.__getitem__
    monkeypatch.setattr(SafetensorsCheckpoint, "__getitem__", failing_read)
    code, err = _run(capsys, "hf-to-jax", "--hf-dir", fixture_dir, "--out", tmp_path / "jax")
    assert code == 1 and "disk went away" in err and len(reads) == 21
    monkeypatch.setattr(checkpoint.ParamsReader, "read", lambda *a: (_ for _ in ()).throw(OSError("no space left")))
    code, err = _run(capsys, "jax-to-hf", "--ckpt", converted, "--out", tmp_path / "hf")
    assert code == 1 and "no space left" in err
    assert list(tmp_path.iterdir()) == []


def test_sigkill_during_conversion_leaves_no_complete_looking_directory(fixture_dir, tmp_path):
    cfg = _config(fixture_dir, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_experts=32,
                  num_hidden_layers=4, head_dim=64, vocab_size=4096)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    specs = tensor_specs(ling_jax.LingConfig.from_hf_dict(cfg))
    save_file({s.hf_name: rng.standard_normal(s.hf_shape, np.float32) for s in specs}, str(src / "model.safetensors"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "hf-to-jax", "--hf-dir", str(src), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 60
    while not list(tmp_path.glob("out.tmp-*/params*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("src",)]
    assert len(leftovers) == 1 and leftovers[0].startswith("out.tmp-")
    assert not checkpoint.is_converted_checkpoint(tmp_path / leftovers[0])


def test_command_line_usage_and_help(capsys, tmp_path):
    assert cw.main is cli.main  # the root script is a shim over ling_jax.cli.convert
    for sub in ("hf-to-jax", "jax-to-hf"):
        with pytest.raises(SystemExit) as info:
            cli.main([sub, "--help"])
        assert info.value.code == 0
        assert "examples:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["hf-to-jax", "--hf-dir", str(tmp_path)])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["jax-to-hf", "--ckpt", "x", "--out", "y", "--max-shard-size", "lots"])
    assert info.value.code == 2 and "invalid size 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["hf-to-jax", "--hf-dir", "x", "--out", "y", "--dtype", "float16"])
    assert info.value.code == 2
    assert "argument --dtype: invalid choice: 'float16' (choose from 'float32', 'bfloat16')" in capsys.readouterr().err
    assert cli.parse_size("5GB") == 5 * 10**9 and cli.parse_size("2GiB") == 2**31 and cli.parse_size("1000") == 1000
    code, err = _run(capsys, "hf-to-jax", "--hf-dir", tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    assert f"convert_weights.py hf-to-jax: error: {tmp_path / 'nope'} does not exist: point --hf-dir at" in err


def test_hf_to_jax_wants_a_hugging_face_directory(capsys, converted, tmp_path):
    code, err = _run(capsys, "hf-to-jax", "--hf-dir", converted, "--out", tmp_path / "out")
    assert code == 2
    assert f"--hf-dir {converted} is a convert_weights.py hf-to-jax output, not a Hugging Face checkpoint" in err
    with pytest.raises(ling_jax.ConfigError, match="dtype='float16' is not a dtype; expected one of float32"):
        convert.convert_hf_to_orbax(converted, tmp_path / "out", dtype="float16")


def test_a_bug_keeps_its_traceback(capsys, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("a programming error")

    monkeypatch.setattr(cli, "convert_hf_to_orbax", broken)
    with pytest.raises(ValueError, match="a programming error"):  # not a UserError: not turned into exit status 1
        cli.main(["hf-to-jax", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "out")])
