"""`ling_jax.io.generation_config` and how `generate` uses a checkpoint's defaults, template and stop ids."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_chat_template import LING2, SPECIALS, _tokenizer_dir

from ling_jax.cli import generate as generate_cli
from ling_jax.io.generation_config import GenerationConfigError, GenerationDefaults


def test_defaults_as_transformers_reads_them(tmp_path):
    assert GenerationDefaults.from_dir(tmp_path) == GenerationDefaults()  # none: greedy
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7], "do_sample": True,
                                                                 "top_p": 0.8, "max_new_tokens": 9}))
    d = GenerationDefaults.from_dir(tmp_path)
    assert (d.eos_token_ids, d.temperature, d.top_k, d.top_p, d.max_new_tokens) == ((1, 7), 1.0, 50, 0.8, 9)
    assert d.resolve(temperature=0.0) == GenerationDefaults((1, 7), 0.0, None, None, 9, d.source)  # flags win
    assert d.resolve(top_k=5, max_new_tokens=3).top_k == 5 and d.resolve(max_new_tokens=3).max_new_tokens == 3
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.7}))
    d = GenerationDefaults.from_dir(tmp_path).resolve()
    assert (d.eos_token_ids, d.temperature, d.top_k, d.max_new_tokens) == ((2,), 0.0, None, 64)  # no do_sample
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(GenerationConfigError, match=r"generation_config.json: eos_token_id must be a token id"):
        GenerationDefaults.from_dir(tmp_path)


@pytest.fixture
def model_dir(tmp_path, fixture_dir):
    """The fixture with a character tokenizer that carries the Ling 2.0-style template, and sampling defaults."""
    d = tmp_path / "model"
    shutil.copytree(fixture_dir, d, ignore=shutil.ignore_patterns("golden*"))
    _tokenizer_dir(d, jinja=LING2)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3], "do_sample": True,
                                                          "temperature": 0.6, "top_k": 20, "max_new_tokens": 4}))
    return d


def test_generate_uses_the_checkpoint_template_defaults_and_stop_ids(model_dir, monkeypatch, capsys):
    seen = {}

    def fake_generate(model, params, ids, **kwargs):
        seen.update(kwargs)
        return np.concatenate([np.asarray(ids), np.full((ids.shape[0], kwargs["max_new_tokens"]), 40)], axis=1)

    monkeypatch.setattr(generate_cli, "generate", fake_generate)
    args = ["--model", str(model_dir), "--chat", "--prompt", "Hi", "--show-prompt", "--dtype", "float32"]
    assert generate_cli.main([*args, "--chat-kwargs", '{"enable_thinking": true}']) == 0
    out = capsys.readouterr().out
    assert ("prompt: <role>SYSTEM</role>You are Ling. thinking on<|role_end|><role>HUMAN</role>Hi<|role_end|>"
            "<role>ASSISTANT</role>") in out
    role_end = SPECIALS.index("<|role_end|>")
    assert (seen["temperature"], seen["top_k"], seen["max_new_tokens"]) == (0.6, 20, 4)
    assert list(seen["eos_token_id"]) == [1, 3, role_end]  # generation_config's list and the template's end of turn
    assert generate_cli.main([*args, "--temperature", "0", "--max-new-tokens", "2", "--eos-token-id", "5"]) == 0
    assert (seen["temperature"], seen["top_k"], seen["max_new_tokens"]) == (0.0, None, 2)
    assert list(seen["eos_token_id"]) == [5, role_end]
    assert generate_cli.main([*args, "--chat-kwargs", "[1]"]) == 2
    assert "must be a JSON object" in capsys.readouterr().err
