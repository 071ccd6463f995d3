"""`ling_jax.io.hub`: Hub ids as model paths, offline against a Hub cache laid out as the client lays it out."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from huggingface_hub import constants

import ling_jax
from ling_jax.io import hub, loading
from ling_jax.io.hf_names import CheckpointNotFoundError

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def _lay_out(cache: pathlib.Path, fixture_dir: pathlib.Path, repo: str = "inclusionAI/Ling-tiny") -> pathlib.Path:
    """The documented cache layout: models--org--name/{refs/main, refs/v1, snapshots/<commit>/...}."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    for commit in (COMMIT, OTHER):
        shutil.copytree(fixture_dir, repo_dir / "snapshots" / commit, ignore=shutil.ignore_patterns("golden*"))
    (repo_dir / "snapshots" / COMMIT / "tokenizer.json").write_text('{"main": true}')
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    (repo_dir / "refs" / "v1").write_text(OTHER)
    return repo_dir


@pytest.fixture
def offline_cache(tmp_path, fixture_dir, monkeypatch) -> pathlib.Path:
    """A Hub cache with one model, and the client pointed at it in offline mode (as HF_HOME + HF_HUB_OFFLINE=1)."""
    cache = tmp_path / "hub"
    repo_dir = _lay_out(cache, fixture_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo_dir


def test_hub_ids_parse():
    assert hub.HubId.parse("inclusionAI/Ling-lite") == hub.HubId("inclusionAI/Ling-lite")
    assert hub.HubId.parse("inclusionAI/Ling-lite@v1.0") == hub.HubId("inclusionAI/Ling-lite", "v1.0")
    assert str(hub.HubId.parse("a/b@refs/pr/1")) == "a/b@refs/pr/1"
    for text in ("/abs/path", "~/models/x", "one", "a/b/c", "./a"):
        assert hub.HubId.parse(text) is None, text


def test_a_hub_id_loads_from_the_cache_offline(offline_cache, tiny):
    ckpt = loading.resolve_checkpoint("inclusionAI/Ling-tiny", "--model")
    assert ckpt.path == str(offline_cache / "snapshots" / COMMIT) and ckpt.kind is loading.CheckpointKind.HF
    model, params = ling_jax.from_pretrained("inclusionAI/Ling-tiny")
    assert model.config == tiny[0].config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tiny[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    by_tag = loading.resolve_checkpoint("inclusionAI/Ling-tiny@v1")  # a ref
    assert by_tag.path == str(offline_cache / "snapshots" / OTHER)
    assert loading.resolve_checkpoint(f"inclusionAI/Ling-tiny@{COMMIT}").path == ckpt.path  # a commit
    tok_dir = hub.local_path("inclusionAI/Ling-tiny", tokenizer_only=True)
    assert (pathlib.Path(tok_dir) / "tokenizer.json").read_text() == '{"main": true}'


def test_a_local_directory_wins(offline_cache, fixture_dir, tmp_path, monkeypatch):
    local = tmp_path / "inclusionAI" / "Ling-tiny"
    shutil.copytree(fixture_dir, local)
    monkeypatch.chdir(tmp_path)
    assert hub.local_path("inclusionAI/Ling-tiny") == "inclusionAI/Ling-tiny"
    assert loading.resolve_checkpoint("inclusionAI/Ling-tiny").path == str(local)


def test_unknown_repo_or_revision_offline_says_not_in_the_local_cache(offline_cache):
    for name in ("inclusionAI/Ling-nothere", "inclusionAI/Ling-tiny@v9"):
        with pytest.raises(CheckpointNotFoundError) as e:
            loading.resolve_checkpoint(name, "--model")
        msg = str(e.value)
        assert f"--model {name} is not in the local cache" in msg, msg
        assert "HF_HUB_OFFLINE=1" in msg and "hf download" in msg and "HF_HOME" in msg, msg


def test_a_missing_file_in_the_cached_snapshot_is_named(offline_cache):
    (offline_cache / "snapshots" / COMMIT / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"inclusionAI/Ling-tiny: the cached snapshot .* lacks "
                                                      r"model-00003-of-00004.safetensors .*hf download"):
        loading.resolve_checkpoint("inclusionAI/Ling-tiny")


@pytest.mark.slow  # a subprocess (the client reads HF_HOME when it is imported)
def test_generate_takes_a_hub_id_from_hf_home_offline(tmp_path, fixture_dir):
    """The client's own environment: HF_HOME says where the cache is, HF_HUB_OFFLINE=1 keeps it off the network."""
    _lay_out(tmp_path / "home" / "hub", fixture_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "ling_jax.cli.generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
           "--dtype", "float32", "--model"]
    ok = subprocess.run([*cmd, "inclusionAI/Ling-tiny"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("[0] "), ok.stderr


def test_generate_refuses_an_unknown_hub_id_in_one_line(offline_cache, capsys):
    from ling_jax.cli.generate import main

    assert main(["--model", "inclusionAI/nothing", "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert f"--model inclusionAI/nothing is not in the local cache ({offline_cache.parent})" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
