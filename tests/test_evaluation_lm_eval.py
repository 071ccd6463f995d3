"""`ling_jax` as an lm-eval model, offline: a local task YAML over a jsonl file, and log-probs against the logits."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval")  # the lm_eval extra; CI installs it

import jax
import jax.numpy as jnp
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from post_training_helpers import char_tokenizer_json

from ling_jax.evaluation.lm_eval_model import LingJaxLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [{"question": "def add(a, b):", "choices": [" return a + b", " return a - b"], "answer": 0},
        {"question": "x = [1, 2", "choices": [", 3]", "}"], "answer": 0},
        {"question": "for i in", "choices": [" range(3):", " rang"], "answer": 1}]


@pytest.fixture(scope="module")
def lm(fixture_dir, tmp_path_factory):
    tok = char_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return LingJaxLM(pretrained=str(fixture_dir), tokenizer=str(tok), batch_size=2)


DIRECT_LEN = 64


@functools.partial(jax.jit, static_argnames="model")
def _logits(model, params, ids):
    return model.apply({"params": params}, ids)


def _direct(lm, context: str, continuation: str) -> float:
    """Sum of log-probs of the continuation's tokens from one forward pass of the whole text (causal: the
    filler after the text changes nothing before it)."""
    ctx = lm.tok_encode(context)
    full = lm.tok_encode(context + continuation)
    ids = np.zeros((1, DIRECT_LEN), np.int32)
    ids[0, : len(full)] = full
    logp = np.asarray(jax.nn.log_softmax(_logits(lm.model, lm.params, jnp.asarray(ids))[0], axis=-1))
    return float(sum(logp[t - 1, full[t]] for t in range(len(ctx), len(full))))


def _instance(kind: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def test_loglikelihood_equals_the_logits(lm):
    pairs = [(d["question"], c) for d in DOCS for c in d["choices"]]
    got = lm.loglikelihood([_instance("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    assert len(got) == 6
    for (context, continuation), (value, greedy) in zip(pairs, got, strict=True):
        assert value == pytest.approx(_direct(lm, context, continuation), abs=1e-4)
        assert isinstance(greedy, bool)
    assert len({round(v, 3) for v, _ in got}) == 6  # different continuations, different scores


@pytest.mark.slow  # compiles the 128-token window (~7 s)
def test_rolling_loglikelihood_covers_every_token_once(lm):
    text = "def f(x):\n    return x * 2\n" * 12  # longer than max_length 128: several windows
    (value,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))], disable_tqdm=True)
    ids = lm.tok_encode(text)
    assert len(ids) > lm.max_length
    windows = lm.score_rows([([lm.prefix_token_id] + ids[:127], 127)])  # the first window alone
    assert value < windows[0][0] < 0


@pytest.mark.slow  # compiles the decode loop (~9 s)
def test_generate_until_stops_at_until(lm):
    requests = [_instance("generate_until", ("def f(x):", {"until": ["\n"], "max_gen_toks": 12}), i)
                for i in range(2)]
    first, second = lm.generate_until(requests, disable_tqdm=True)
    assert first == second and "\n" not in first  # greedy: deterministic


def _task_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ling_toy.yaml").write_text(f"""task: ling_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return tasks


def test_local_task_yaml_through_simple_evaluate(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    tasks = TaskManager(include_path=str(_task_dir(tmp_path)), include_defaults=False)  # only the local YAML
    out = simple_evaluate(model=lm, tasks=["ling_toy"], task_manager=tasks, log_samples=True)
    samples = out["samples"]["ling_toy"]
    assert len(samples) == 3
    for sample in samples:
        doc = sample["doc"]
        scores = [r[0][0] for r in sample["resps"]]
        direct = [_direct(lm, doc["question"], " " + c) for c in doc["choices"]]  # lm-eval's target_delimiter
        np.testing.assert_allclose(scores, direct, atol=1e-4)
    acc = out["results"]["ling_toy"]["acc,none"]
    expected = np.mean([int(np.argmax([r[0][0] for r in s["resps"]]) == s["doc"]["answer"]) for s in samples])
    assert acc == pytest.approx(expected)


@pytest.mark.slow  # a fresh process: imports and compiles again (~40 s)
def test_the_lm_eval_command_knows_ling_jax(fixture_dir, tmp_path):
    tok = char_tokenizer_json(tmp_path / "tokenizer.json")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "c"),
           "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "ling_jax.evaluation.lm_eval_cli", "--model", "ling_jax", "--model_args",
           f"pretrained={fixture_dir},tokenizer={tok},dtype=float32", "--tasks", "ling_toy", "--include_path",
           str(_task_dir(tmp_path)), "--output_path", str(tmp_path / "results")]
    ran = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "ling_toy" in ran.stdout and "acc" in ran.stdout
