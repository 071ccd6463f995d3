"""End to end on the fixture: hf-to-jax, SFT with train.py, DPO from the SFT run, jax-to-hf, load back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from post_training_helpers import (
    CHARS,
    char_tokenizer_json,
    chat_records,
    preference_records,
    small_recipe,
    write_jsonl,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import convert_weights  # noqa: E402
import ling_jax  # noqa: E402
import train  # noqa: E402
from configs import dpo as dpo_recipe  # noqa: E402
from configs import sft as sft_recipe  # noqa: E402
from ling_jax.cli import generate as generate_cli  # noqa: E402
from ling_jax.io.safetensors import SafetensorsCheckpoint  # noqa: E402


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fixture_dir):
    tmp = tmp_path_factory.mktemp("post")
    converted = tmp / "converted"
    assert convert_weights.main(["hf-to-jax", "--hf-dir", str(fixture_dir), "--out", str(converted)]) == 0
    tok = char_tokenizer_json(tmp / "tokenizer.json")
    return tmp, converted, tok


@pytest.mark.slow  # 60 s on CI: SFT, DPO and an export, each compiled
def test_sft_then_dpo_then_export(setup):
    tmp, converted, tok = setup
    chats = write_jsonl(tmp / "chat.jsonl", chat_records(64))
    pairs = write_jsonl(tmp / "pairs.jsonl", preference_records(64))

    # SFT: the architecture comes from the converted checkpoint (no preset), loss on assistant tokens.
    sft_dir = str(tmp / "sft")
    sft_cfg = small_recipe(sft_recipe.get_config(), init_from=converted, data=chats, tokenizer=tok)
    sft_cfg.schedule.peak_value = 1e-3
    sft_loss = train.run(sft_cfg, sft_dir)
    rows = [r for r in _rows(sft_dir) if "loss" in r]
    assert len(rows) == 3 and np.isfinite(sft_loss)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"data/truncated", "data/dropped_too_long"} <= set(rows[0])

    # The run keeps its tokenizer: the workdir is a model for generate (no --tokenizer).
    assert (tmp / "sft" / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert generate_cli.main(["--model", sft_dir, "--prompt", "repeat", "--max-new-tokens", "2", "--dtype",
                              "float32"]) == 0

    # DPO from the SFT workdir (its latest checkpoint is the policy's start and the reference; its tokenizer
    # is the run's, as config.data.tokenizer is not set).
    dpo_dir = str(tmp / "dpo")
    dpo_cfg = small_recipe(dpo_recipe.get_config(), init_from=sft_dir, data=pairs, tokenizer="")
    dpo_cfg.schedule.peak_value = 1e-3
    dpo_cfg.dpo.reference_dtype = ""  # float32 like the policy (the recipe's bf16 matches bf16 compute)
    train.run(dpo_cfg, dpo_dir)
    rows = [r for r in _rows(dpo_dir) if "loss" in r]
    assert len(rows) == 3
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at the first step
    assert rows[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen"):
        assert key in rows[-1]
    assert rows[-1]["rewards/margin"] != 0.0

    # Export the DPO policy and load the safetensors back: the same values as the trained params.
    out = tmp / "hf"
    step_dir = os.path.join(dpo_dir, "checkpoints", "3")
    assert convert_weights.main(["jax-to-hf", "--ckpt", step_dir, "--out", str(out)]) == 0
    trained = ling_jax.restore_params(step_dir, params_key="params")
    _, exported = ling_jax.from_pretrained(str(out))
    for a, b in zip(_leaves(trained), _leaves(exported), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sft_params = ling_jax.restore_params(os.path.join(sft_dir, "checkpoints", "3"), params_key="params")
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(sft_params), _leaves(trained), strict=True))
    tensors = SafetensorsCheckpoint(str(out))
    assert tensors["lm_head.weight"].shape == (512, 64)
    with open(out / "config.json") as f:
        assert json.load(f)["num_hidden_layers"] == 3

    # The export carries the run's tokenizer and answers through the chat template from the command line.
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    cmd = [sys.executable, "-m", "ling_jax.cli.generate", "--model", str(out), "--chat",
           "--prompt", "repeat apple river stone", "--system", "Be brief.", "--max-new-tokens", "4",
           "--dtype", "float32", "--show-prompt"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert ("<role>SYSTEM</role>Be brief.<role>HUMAN</role>repeat apple river stone<role>ASSISTANT</role>"
            in res.stdout), res.stdout


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_tokenizer_must_fit_and_dpo_needs_init_from(setup, tmp_path):
    tmp, converted, _ = setup
    import tokenizers

    big = tmp_path / "big.json"
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *CHARS, *(f"w{i}" for i in range(600 - 1 - len(CHARS)))])}
    tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[])).save(str(big))
    chats = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    cfg = small_recipe(sft_recipe.get_config(), init_from=converted, data=chats, tokenizer=big)
    with pytest.raises(train.RunError, match=r"has 600 tokens but the model's vocab_size is 512"):
        train.run(cfg, str(tmp_path / "w1"))
    cfg = small_recipe(dpo_recipe.get_config(), init_from=converted, data=chats, tokenizer=tmp / "tokenizer.json")
    cfg.init_from = ""
    cfg.model_overrides.vocab_size = 128
    with pytest.raises(ValueError, match=r"DPO needs config.init_from"):
        train.run(cfg, str(tmp_path / "w2"))
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/sft.py", "--workdir", str(tmp_path / "w3"),
                          f"--config.init_from={tmp_path / 'nowhere'}", f"--config.data.path={chats}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "no such file or directory" in out.stderr and "Traceback" not in out.stderr
