"""`ling_jax.io.orbax_params`: streamed saves, slice reads and partial, sharded, keyed restores."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

import ling_jax
from ling_jax.io import orbax_params
from ling_jax.io.convert import convert_hf_to_orbax
from ling_jax.io.hf_names import CheckpointError, CheckpointNotFoundError
from ling_jax.io.orbax_params import ParamsReader, StreamedArray, restore_params
from ling_jax.io.safetensors import SafetensorsCheckpoint

ROUTER = ("moe_layers", "mlp", "router")
GATE = ("moe_layers", "mlp", "gate_proj")


@pytest.fixture(scope="module")
def config(fixture_dir):
    return ling_jax.LingConfig.from_json_file(str(fixture_dir / "config.json"))


@pytest.fixture(scope="module")
def reference(fixture_dir, config):
    """The fixture's parameters as NumPy (bfloat16, as stored), read straight from the safetensors."""
    return orbax_params.flatten(ling_jax.from_hf_state_dict(SafetensorsCheckpoint(str(fixture_dir)), config))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, fixture_dir):
    return pathlib.Path(convert_hf_to_orbax(fixture_dir, tmp_path_factory.mktemp("orbax") / "converted"))


@pytest.fixture(scope="module")
def train_state(tmp_path_factory, reference):
    """A plain Orbax checkpoint of `{"params": ..., "step": 3}` (coarse chunks, as a training run writes)."""
    path = tmp_path_factory.mktemp("orbax") / "state"
    params = orbax_params.unflatten({p: jnp.asarray(v, jnp.float32) for p, v in reference.items()})
    with ocp.StandardCheckpointer() as saver:
        saver.save(path, {"params": params, "step": 3})
        saver.wait_until_finished()
    return path


def test_flatten_and_unflatten_are_inverse():
    tree = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    flat = orbax_params.flatten(tree)
    assert flat == {("a", "b"): 1, ("a", "c", "d"): 2, ("e",): 3}
    assert orbax_params.unflatten(flat) == tree
    assert orbax_params.unflatten(flat, ("params",)) == {"params": tree}


def test_save_streamed_commits_in_parts_and_restores_exactly(tmp_path):
    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((4, 3, 5)).astype(ml_dtypes.bfloat16)  # [L, D, F], written one layer at a time
    calls = []

    def layers():
        calls.append("fill")
        for i in range(4):
            yield (i,), stacked[i]  # leaf[i] = one [D, F] slice

    tree = {"stack": {"w": StreamedArray((4, 3, 5), np.dtype(ml_dtypes.bfloat16), (1, 3, 5), layers)},
            "norm": StreamedArray((5,), np.dtype(np.float32), (5,), lambda: [((), np.arange(5, dtype=np.float32))])}
    assert tree["stack"]["w"].nbytes == 4 * 3 * 5 * 2
    orbax_params.save_streamed(str(tmp_path / "params"), tree, flush_bytes=40)  # a commit after every layer
    assert calls == ["fill"]
    back = ocp.PyTreeCheckpointer().restore(tmp_path / "params")
    assert back["stack"]["w"].dtype == ml_dtypes.bfloat16
    assert back["stack"]["w"].tobytes() == stacked.tobytes()
    np.testing.assert_array_equal(back["norm"], [0, 1, 2, 3, 4])
    meta = ocp.PyTreeCheckpointHandler().metadata(tmp_path / "params").tree
    assert meta["stack"]["w"].storage.chunk_shape == (1, 3, 5)


def test_restore_params_keys_and_dtype(converted, reference):
    part = restore_params(converted, keys=[ROUTER, ("norm", "scale")], dtype=jnp.float32)
    assert orbax_params.flatten(part).keys() == {ROUTER, ("norm", "scale")}
    assert part["moe_layers"]["mlp"]["router"].shape == (2, 64, 8)
    assert part["moe_layers"]["mlp"]["router"].dtype == jnp.float32
    np.testing.assert_array_equal(part["moe_layers"]["mlp"]["router"], reference[ROUTER].astype(np.float32))
    stored = restore_params(converted, keys=[ROUTER])
    assert stored["moe_layers"]["mlp"]["router"].dtype == jnp.bfloat16  # no dtype: as stored
    with pytest.raises(CheckpointError, match=r"has no parameter\(s\) moe_layers/mlp/nope"):
        restore_params(converted, keys=[("moe_layers", "mlp", "nope")])


def test_restore_params_places_each_leaf_by_its_path(converted):
    device = jax.devices()[0]
    asked = []

    def sharding_of(path):
        asked.append(path)
        return jax.sharding.SingleDeviceSharding(device)

    out = restore_params(converted, keys=[ROUTER, GATE], sharding=sharding_of)
    assert sorted(asked) == sorted([ROUTER, GATE])
    assert out["moe_layers"]["mlp"]["gate_proj"].sharding == jax.sharding.SingleDeviceSharding(device)
    one = restore_params(converted, keys=[GATE], sharding=jax.sharding.SingleDeviceSharding(device))
    assert one["moe_layers"]["mlp"]["gate_proj"].shape == (2, 8, 64, 32)


def test_params_key_selects_the_parameter_tree(train_state, reference, config):
    default = restore_params(train_state, keys=[ROUTER])  # the root has `params` and no `embed`: taken
    keyed = restore_params(train_state, keys=[ROUTER], params_key="params", config=config)
    as_tuple = restore_params(train_state, keys=[ROUTER], params_key=("params",))
    for tree in (default, keyed, as_tuple):
        np.testing.assert_array_equal(tree["moe_layers"]["mlp"]["router"], reference[ROUTER].astype(np.float32))
    with pytest.raises(CheckpointError, match=r"no key 'opt_state' \(keys there: params, step\).*--params-key"):
        restore_params(train_state, params_key="opt_state")
    with pytest.raises(CheckpointError, match=r"no key 'params.inner' \(keys there: dense_layers, embed, "):
        restore_params(train_state, params_key="params/inner")


def test_a_config_mismatch_lists_every_leaf(train_state, fixture_dir):
    cfg = json.loads((fixture_dir / "config.json").read_text())
    small = ling_jax.LingConfig.from_hf_dict(dict(cfg, num_experts=4, vocab_size=256))
    with pytest.raises(CheckpointError) as info:
        restore_params(train_state, config=small)
    msg = str(info.value)
    assert "parameter(s) do not match the config" in msg
    assert "moe_layers/mlp/gate_proj: expected shape (2, 4, 64, 32), found (2, 8, 64, 32)" in msg
    assert "embed/embedding: expected shape (256, 64), found (512, 64)" in msg


def test_params_reader_reads_single_slices(converted, train_state, reference, config):
    reader = ParamsReader(converted, config)
    assert reader.dtype(GATE) == ml_dtypes.bfloat16
    expert = reader.read(GATE, (1, 3))  # MoE layer 1, expert 3: one chunk
    assert expert.shape == (64, 32) and expert.tobytes() == reference[GATE][1, 3].tobytes()
    coarse = ParamsReader(train_state, config, "params")  # one chunk holds every layer
    assert coarse.dtype(GATE) == np.float32
    np.testing.assert_array_equal(coarse.read(GATE, (0, 7)), reference[GATE][0, 7].astype(np.float32))
    np.testing.assert_array_equal(coarse.read(("norm", "scale"), ()), reference[("norm", "scale")].astype(np.float32))


def test_where_the_parameters_are(converted, train_state, tmp_path, fixture_dir):
    assert orbax_params.is_converted_checkpoint(converted) and not orbax_params.is_converted_checkpoint(fixture_dir)
    assert orbax_params.resolve_params_location(converted) == (str(converted / "params"), ())
    assert orbax_params.resolve_params_location(train_state, "state.params") == (str(train_state), ("state", "params"))
    assert orbax_params.resolve_params_location(train_state.parent) == (str(train_state), None)  # the one item
    with pytest.raises(CheckpointNotFoundError, match="convert it with hf-to-jax first"):
        orbax_params.resolve_params_location(fixture_dir)
    with pytest.raises(CheckpointNotFoundError, match=f"{tmp_path} is neither a converted checkpoint"):
        orbax_params.resolve_params_location(tmp_path)
