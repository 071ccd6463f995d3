"""`ling_jax.io.safetensors`: the lazy reader's checks and the streaming shard writer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import ling_jax
from ling_jax.io.hf_names import CheckpointNotFoundError
from ling_jax.io.safetensors import SafetensorsCheckpoint


@pytest.fixture(scope="module")
def hf_tensors(fixture_dir):
    ckpt = SafetensorsCheckpoint(str(fixture_dir))
    return {name: ckpt[name] for name in ckpt}


def _copy_fixture(fixture_dir, dst):
    shutil.copytree(fixture_dir, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def test_the_reader_is_lazy_and_reads_headers_only_for_shapes(fixture_dir, hf_tensors):
    ckpt = SafetensorsCheckpoint(str(fixture_dir))
    assert len(ckpt) == len(hf_tensors) == 74
    assert ckpt.shapes()["model.layers.1.mlp.experts.5.down_proj.weight"] == (64, 32)
    assert ckpt.dtypes()["model.word_embeddings.weight"] == np.dtype("bfloat16")
    assert ckpt["model.norm.weight"].tobytes() == hf_tensors["model.norm.weight"].tobytes()


def test_bad_checkpoints_name_the_file_and_the_fix(tmp_path, fixture_dir):
    ckpt = _copy_fixture(fixture_dir, tmp_path / "ckpt")
    (ckpt / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"missing from .*ckpt: model-00003-of-00004\.safetensors; "
                                                      "re-download"):
        SafetensorsCheckpoint(str(ckpt))
    ckpt2 = _copy_fixture(fixture_dir, tmp_path / "ckpt2")
    (ckpt2 / "model-00002-of-00004.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(ling_jax.CheckpointError, match=r"model-00002-of-00004\.safetensors is not a readable "
                                                       "safetensors file"):
        SafetensorsCheckpoint(str(ckpt2))
    with pytest.raises(CheckpointNotFoundError, match=r"has neither model.safetensors.index.json nor "
                                                      "model.safetensors: point at a Hugging Face"):
        SafetensorsCheckpoint(str(tmp_path))


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

