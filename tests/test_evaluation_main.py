"""`python -m ling_jax.evaluation` end to end on fixture A and a train.py checkpoint; `code_scores`; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from post_training_helpers import char_tokenizer_json
from test_evaluation_prompts import fim_tokenizer

import ling_jax.evaluation.__main__ as cli
from ling_jax.data.tokenizer import train_sentencepiece
from ling_jax.evaluation import code_scores
from ling_jax.evaluation.runner import SAMPLES_FILE, SUMMARY_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = "humaneval,humaneval_infill_single,humaneval_infill_multi"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    fim_tokenizer(path)
    return str(path)


def _read(out):
    with open(os.path.join(out, SAMPLES_FILE)) as f:
        samples = [json.loads(line) for line in f]
    with open(os.path.join(out, SUMMARY_FILE)) as f:
        return samples, json.load(f)


def test_fixture_a_limit_3_writes_samples_and_summary(fixture_dir, tok_path, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = ["--model", str(fixture_dir), "--tokenizer", tok_path, "--tasks", TASKS, "--out", out, "--limit", "3",
            "--dtype", "float32", "--workers", "2", "--timeout", "5"]
    assert cli.main(args) == 0
    samples, summary = _read(out)
    assert [s["task"] for s in samples] == ["humaneval"] * 3 + ["humaneval_infill_single"] * 3 + \
        ["humaneval_infill_multi"] * 3
    assert samples[3]["task_id"] == "SingleLineInfilling/HumanEval/0/L0"
    for s in samples:  # a random model writes no working code
        assert s["passed"] is False and s["kind"] in {"syntax", "assertion", "exception", "timeout", "early_exit"}
    for task, s in summary["tasks"].items():
        assert s["problems"] == 3 and s["samples"] == 3 and s["pass@1"] == 0.0, task
        assert sum(s["failures"].values()) == 3
        assert s["max_new_tokens"] == [64]  # half of max_position_embeddings 128
        assert s["generation_tokens_per_second"] > 0 and s["programs_per_second"] > 0
    assert summary["tasks"]["humaneval"]["truncated_prompts"] == 3  # HumanEval prompts exceed 64 tokens here
    assert summary["settings"]["n"] == 1 and summary["settings"]["temperature"] == 0.0
    assert "humaneval: pass@1 0.0000" in capsys.readouterr().out
    # Greedy is deterministic: a second run writes the same completions.
    again = str(tmp_path / "again")
    assert cli.main([*args[:5], "humaneval", "--out", again, *args[8:]]) == 0
    assert [s["completion"] for s in _read(again)[0]] == [s["completion"] for s in samples[:3]]
    assert cli.main(args) == 2  # the output exists: refused without --overwrite
    assert "already exists" in capsys.readouterr().err


def test_code_scores_for_training(tiny, tok_path):
    from ling_jax.data.tokenizer import load_tokenizer

    model, params = tiny
    scores = code_scores(model, params, load_tokenizer(tok_path), ["humaneval", "humaneval_infill_single"], 2,
                         batch_size=8, workers=2)
    assert scores == {"humaneval_pass@1": 0.0, "humaneval_infill_single_pass@1": 0.0}


@pytest.fixture
def refuse_weights(monkeypatch):
    """Bad input must be refused before any weights are loaded (and so before any generation)."""
    def boom(*a, **k):
        raise AssertionError("weights loaded before the input was checked")

    monkeypatch.setattr(cli, "from_pretrained", boom)


@pytest.mark.parametrize("extra,message", [
    (["--tasks", "humaneval,mbpp"], "unknown task 'mbpp'"),
    (["--tasks", "jsonl:/no/such/file.jsonl"], "no such file"),
    (["--tasks", "humaneval", "--n", "2", "--k", "1,5"], "--k 5 needs at least 5 samples per problem but --n is 2"),
    (["--tasks", "humaneval", "--temperature", "-1"], "temperature must be >= 0"),
])
def test_bad_input_exits_2_before_any_work(fixture_dir, tmp_path, capsys, refuse_weights, extra, message):
    tok = char_tokenizer_json(tmp_path / "tokenizer.json")
    args = ["--model", str(fixture_dir), "--tokenizer", str(tok), "--out", str(tmp_path / "out"), *extra]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_malformed_task_file_and_bad_model_path(fixture_dir, tmp_path, capsys, refuse_weights):
    bad = tmp_path / "suite.jsonl"
    bad.write_text('{"task_id": "a", "prompt": "x", "tests": "pass"}\nnot json\n')
    assert cli.main(["--model", str(fixture_dir), "--tasks", f"jsonl:{bad}", "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: not JSON" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path), "--tasks", "humaneval", "--out", str(tmp_path / "o")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    tok = fim_tokenizer(tmp_path / "plain.model", fim=False)
    assert cli.main(["--model", str(fixture_dir), "--tokenizer", str(tok.path), "--tasks", "humaneval_infill_multi",
                     "--out", str(tmp_path / "o")]) == 2
    assert "FIM sentinels" in capsys.readouterr().err
    no_eot = train_sentencepiece(["def f(): pass"] * 20, tmp_path / "no_eot.model", 280)
    assert cli.main(["--model", str(fixture_dir), "--tokenizer", str(no_eot.path), "--tasks", "humaneval", "--chat",
                     "--out", str(tmp_path / "o")]) == 2
    assert "end-of-text string '<|endoftext|>' is not a token" in capsys.readouterr().err


def test_module_entry_point_usage_error(tmp_path):
    ran = subprocess.run([sys.executable, "-m", "ling_jax.evaluation", "--tasks", "humaneval"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "--model" in ran.stderr


@pytest.mark.slow  # a train.py run and a second model's compiles (~35 s)
def test_train_py_checkpoint_limit_3(tmp_path, capsys):
    from train_helpers import tiny_config

    import train

    workdir = str(tmp_path / "run")
    train.run(tiny_config(steps=1, checkpoint_every=1, eval_every=0), workdir)
    tok = char_tokenizer_json(tmp_path / "tokenizer.json")  # 103 tokens: fits the run's vocabulary of 256
    out = str(tmp_path / "out")
    assert cli.main(["--model", workdir, "--tokenizer", str(tok), "--tasks", "humaneval", "--out", out,
                     "--limit", "3", "--dtype", "float32", "--max-new-tokens", "16"]) == 0
    samples, summary = _read(out)
    assert len(samples) == 3 and summary["tasks"]["humaneval"]["problems"] == 3
    assert summary["model"].endswith(os.path.join("checkpoints", "1"))
    assert summary["tasks"]["humaneval"]["max_new_tokens"] == [16]


def test_chat_prompts_run_end_to_end(fixture_dir, tok_path, tmp_path):
    out = str(tmp_path / "chat")
    assert cli.main(["--model", str(fixture_dir), "--tokenizer", tok_path, "--tasks", "humaneval", "--chat",
                     "--out", out, "--limit", "2", "--dtype", "float32"]) == 0
    samples, summary = _read(out)
    assert summary["settings"]["chat"] is True and len(samples) == 2
    assert all(s["passed"] is False for s in samples)


@pytest.mark.slow  # the sampling decode loop compiles on its own (~10 s)
def test_sampling_for_pass_at_k(fixture_dir, tok_path, tmp_path):
    out = str(tmp_path / "sampled")
    args = ["--model", str(fixture_dir), "--tokenizer", tok_path, "--tasks", "humaneval", "--limit", "2",
            "--dtype", "float32", "--n", "3", "--temperature", "0.8", "--top-p", "0.95", "--k", "1,3", "--seed", "1"]
    assert cli.main([*args, "--out", out]) == 0
    samples, summary = _read(out)
    assert [(s["task_id"], s["sample"]) for s in samples] == [(f"HumanEval/{i}", j) for i in range(2) for j in range(3)]
    assert len({s["completion"] for s in samples[:3]}) > 1  # sampled, not greedy
    assert summary["tasks"]["humaneval"]["pass@1"] == 0.0 and summary["tasks"]["humaneval"]["pass@3"] == 0.0
    assert cli.main([*args, "--out", str(tmp_path / "again")]) == 0  # the same seed, the same samples
    assert [s["completion"] for s in _read(str(tmp_path / "again"))[0]] == [s["completion"] for s in samples]
