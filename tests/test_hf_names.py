"""`ling_jax.io.hf_names`: the Hugging Face tensor table, both directions, bit-exact, and its checks."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest

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
