"""`ling_jax.convert` and `ling_jax.pretrained`: Hugging Face tensors <-> parameter tree."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import ling_jax
from ling_jax.io.hf_names import tensor_specs
from ling_jax.io.safetensors import SafetensorsCheckpoint


@pytest.fixture(scope="module")
def hf_tensors(fixture_dir):
    ckpt = SafetensorsCheckpoint(str(fixture_dir))
    return {name: ckpt[name] for name in ckpt}


def _config(fixture_dir, **changes):
    d = json.loads((fixture_dir / "config.json").read_text())
    return ling_jax.LingConfig.from_hf_dict(dict(d, **changes))


def test_round_trip_is_bit_exact(fixture_dir, hf_tensors):
    cfg = _config(fixture_dir)
    params = ling_jax.from_hf_state_dict(hf_tensors, cfg)
    assert params["moe_layers"]["mlp"]["gate_proj"].shape == (2, 8, 64, 32)
    assert params["dense_layers"]["attention"]["q_proj"].shape == (1, 64, 4, 16)
    assert params["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    back = ling_jax.to_hf_state_dict(params, cfg)
    assert set(back) == set(hf_tensors)
    for name, ref in hf_tensors.items():
        assert back[name].dtype == ref.dtype and back[name].shape == ref.shape, name
        assert back[name].tobytes() == ref.tobytes(), name


def test_qkv_rows_are_query_heads_then_keys_then_values(fixture_dir, hf_tensors):
    cfg = _config(fixture_dir)
    params = ling_jax.from_hf_state_dict(hf_tensors, cfg, dtype=np.float32)
    w = hf_tensors["model.layers.2.attention.query_key_value.weight"].astype(np.float32)
    k_proj = params["moe_layers"]["attention"]["k_proj"][1]  # layer 2 = second MoE layer
    # key head 1, dim 3 is fused row (N + 1) * H + 3.
    np.testing.assert_array_equal(k_proj[:, 1, 3], w[(4 + 1) * 16 + 3])
    expert = params["moe_layers"]["mlp"]["down_proj"][0, 5]
    np.testing.assert_array_equal(expert, hf_tensors["model.layers.1.mlp.experts.5.down_proj.weight"].T)


def test_missing_and_misshapen_tensors_are_all_listed(fixture_dir, hf_tensors):
    cfg = _config(fixture_dir)
    bad = dict(hf_tensors)
    del bad["model.layers.1.mlp.experts.3.up_proj.weight"]
    bad["model.norm.weight"] = np.zeros(65, np.float32)
    bad["model.layers.0.attention.dense.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ling_jax.CheckpointError) as info:
        ling_jax.from_hf_state_dict(bad, cfg)
    msg = str(info.value)
    assert "3 tensor(s)" in msg
    assert "missing model.layers.1.mlp.experts.3.up_proj.weight (expected shape (32, 64))" in msg
    assert "model.norm.weight: expected shape (64,), found (65,)" in msg
    assert "model.layers.0.attention.dense.weight: expected shape (64, 64), found (64, 32)" in msg


def test_unexpected_tensor_is_rejected(fixture_dir, hf_tensors):
    bad = dict(hf_tensors, **{"model.layers.9.mlp.gate.weight": np.zeros((8, 64), np.float32)})
    with pytest.raises(ling_jax.CheckpointError, match=r"unexpected tensor model.layers.9.mlp.gate.weight"):
        ling_jax.from_hf_state_dict(bad, _config(fixture_dir))


def test_tied_embeddings_and_all_moe_layers_specs(fixture_dir):
    cfg = _config(fixture_dir, tie_word_embeddings=True, first_k_dense_replace=0)
    names = [s.hf_name for s in tensor_specs(cfg)]
    assert "lm_head.weight" not in names and "model.layers.0.mlp.gate.weight" in names
    params = ling_jax.init_params(ling_jax.LingForCausalLM(cfg), jax.random.key(0))
    back = ling_jax.from_hf_state_dict(ling_jax.to_hf_state_dict(params, cfg), cfg)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(a, b)


def test_from_pretrained_single_file_checkpoint(tmp_path, fixture_dir, hf_tensors, golden):
    shutil.copy(fixture_dir / "config.json", tmp_path / "config.json")
    save_file({k: v.astype(np.float32) for k, v in hf_tensors.items()}, str(tmp_path / "model.safetensors"))
    model, params = ling_jax.from_pretrained(str(tmp_path))
    logits = model.apply({"params": params}, jnp.asarray(golden["forward_input_ids"]))
    np.testing.assert_allclose(logits, golden["forward_logits"], atol=2e-4)


def _copy_fixture(fixture_dir, dst):
    shutil.copytree(fixture_dir, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_from_pretrained_bad_checkpoints(tmp_path, fixture_dir):
    ckpt = _copy_fixture(fixture_dir, tmp_path / "ckpt")
    (ckpt / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00003-of-00004\.safetensors"):
        ling_jax.from_pretrained(str(ckpt))
    ckpt2 = _copy_fixture(fixture_dir, tmp_path / "ckpt2")
    (ckpt2 / "model-00002-of-00004.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ling_jax.CheckpointError, match=r"model-00002-of-00004\.safetensors"):
        ling_jax.from_pretrained(str(ckpt2))
    cfg = json.loads((ckpt2 / "config.json").read_text())
    (ckpt2 / "config.json").write_text(json.dumps(dict(cfg, model_type="qwen2_moe")))
    with pytest.raises(ling_jax.ConfigError, match="supported: bailing_moe"):
        ling_jax.from_pretrained(str(ckpt2))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ling_jax.from_pretrained(str(tmp_path))


def test_leaf_sources_cover_every_slice_once(fixture_dir):
    from ling_jax.io.hf_names import leaf_sources
    from ling_jax.model.params import abstract_params as param_shapes

    cfg = _config(fixture_dir)
    sources = leaf_sources(cfg)
    shapes = param_shapes(cfg)
    flat = jax.tree_util.tree_leaves_with_path(shapes)
    leaves = {tuple(k.key for k in path): leaf for path, leaf in flat}
    assert set(sources) == set(leaves)
    for path, srcs in sources.items():
        depth = len(srcs[0].index)
        indices = [s.index for s in srcs]
        assert len(set(indices)) == len(indices) == int(np.prod(leaves[path].shape[:depth])), path
    assert [s.spec.hf_name for s in sources[("moe_layers", "attention", "k_proj")]] == [
        "model.layers.1.attention.query_key_value.weight", "model.layers.2.attention.query_key_value.weight"]


def test_streamed_safetensors_files_load_with_the_reference_reader(tmp_path, hf_tensors):
    from safetensors.numpy import load_file

    from ling_jax.io.safetensors import TensorEntry, plan_shards, write_hf_shards

    names = sorted(hf_tensors)[:10]
    entries = [TensorEntry(n, hf_tensors[n].dtype, hf_tensors[n].shape) for n in names]
    index = write_hf_shards(str(tmp_path), entries, hf_tensors.__getitem__, max_shard_bytes=20_000)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == len(plan_shards(entries, 20_000)) > 1
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))
    assert sorted(loaded) == names
    for n in names:
        assert loaded[n].dtype == hf_tensors[n].dtype and loaded[n].tobytes() == hf_tensors[n].tobytes()
    big = TensorEntry("big", np.dtype(np.float32), (100,))
    assert [[e.name for e in s] for s in plan_shards([big, entries[0]], 10)] == [["big"], [entries[0].name]]
