"""`train.py`: exact resume (also after kill -9), metrics, and its input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from train_helpers import kill_9_after_checkpoint, logged_losses, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from ling_jax.config import UserError  # noqa: E402
from ling_jax.train.checkpointing import CheckpointMismatchError  # noqa: E402


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    train.run(tiny_config(), workdir)
    return workdir


def test_metrics_rows_and_checkpoints(straight):
    with open(os.path.join(straight, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in ("learning_rate", "grad_norm", "tokens_per_second", "mfu", "expert_load", "balance_loss"):
        assert key in train_rows[0], key
    load = train_rows[0]["expert_load"]
    assert len(load) == 1 and len(load[0]) == 8 and abs(sum(load[0]) - 1) < 1e-4
    assert any("eval_loss" in r for r in rows)
    assert sorted(os.listdir(os.path.join(straight, "checkpoints")))[-2:] == ["3", "6"]
    assert os.listdir(os.path.join(straight, "tensorboard"))


@pytest.mark.slow  # 60 s; kill -9 resumes are checked in tests/test_faults.py and test_train_stages.py (slow too)
def test_resume_is_bit_identical(straight, tmp_path):
    workdir = str(tmp_path)
    train.run(tiny_config(steps=3), workdir)
    train.run(tiny_config(steps=6), workdir)
    assert logged_losses(workdir) == logged_losses(straight)


@pytest.mark.slow  # 60 s; tests/test_faults.py kills a run during a checkpoint write (slow too)
def test_resume_after_kill_9(straight, tmp_path):
    """A fresh process killed mid-run resumes from its last checkpoint to the same losses."""
    workdir = str(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "default.py"),
           "--workdir", workdir, "--config.steps=400", "--config.checkpoint_every=3", "--config.log_every=1",
           "--config.eval_every=3", "--config.eval_batches=2", "--config.batch_size=4", "--config.seq_len=32",
           "--config.model_overrides.num_hidden_layers=2", "--config.model_overrides.vocab_size=256",
           "--config.model_overrides.max_position_embeddings=64", "--config.data.vocab_size=256",
           "--config.data.synthetic_num_docs=2000", "--config.peak_flops_per_device=1e11",
           "--config.loss.balance_loss_weight=0.01", "--config.loss.accumulation_steps=2",
           "--config.schedule.decay_steps=100"]
    kill_9_after_checkpoint(cmd, workdir, 6, 240)
    train.run(tiny_config(steps=9, **{"schedule.decay_steps": 100}), workdir)
    reference = str(tmp_path / "reference")
    train.run(tiny_config(steps=9, **{"schedule.decay_steps": 100}), reference)
    resumed, ref = logged_losses(workdir), logged_losses(reference)
    assert all(resumed[s] == ref[s] for s in range(1, 10)), (resumed, ref)


def test_workdir_of_another_model_is_refused(straight):
    with pytest.raises(CheckpointMismatchError, match="different model") as e:
        train.run(tiny_config(steps=8, **{"model_overrides.hidden_size": 32}), straight)
    assert isinstance(e.value, UserError)  # train.py reports it in one line, without a traceback


@pytest.mark.slow  # 30 s on CI: two runs, one poisoned
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(steps=6, **{"schedule.peak_value": float("nan")})
    with pytest.raises(train.RunError, match="loss is nan"):
        train.run(cfg, str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "3"))


def test_empty_dataset_exits_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "train.py", "--config", "configs/default.py", "--workdir", str(tmp_path / "w")]
    out = subprocess.run([*cmd, "--config.data.kind=text_dir", f"--config.data.path={empty}",
                          "--config.tokenizer_vocab_size=64"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "no text_dir files" in out.stderr and "Traceback" not in out.stderr


def _text_config(tmp_path, **changes):
    """Real text: a few stdlib modules, a tokenizer trained on them, FIM and packing."""
    import shutil
    import sysconfig

    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "keyword.py"):
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), src / name)
    c = tiny_config(**changes)
    c.data.kind, c.data.path, c.data.fim_rate, c.data.eval_fraction = "text_dir", str(src), 0.5, 0.15
    c.tokenizer_vocab_size = 512  # byte fallback needs 256 + the characters
    c.model_overrides.vocab_size = None
    return c


def test_demo_ending_samples_every_prompt_then_names_the_last_checkpoint(tmp_path, capsys):
    """The demo's end (samples, closing note) after the checkpointer is closed, with shuffled rows."""
    cfg = _text_config(tmp_path, steps=2, checkpoint_every=2, eval_every=0, sample_tokens=6, closing_note=True)
    cfg.sample_prompts = ("def f(x):\n    ", "import os\n")
    cfg.data.row_shuffle_window = 16
    workdir = str(tmp_path / "run")
    train.run(cfg, workdir)
    out = capsys.readouterr().out
    samples = out[out.index("--- sample from the trained model ---\n"):out.index("--- the run is a model")]
    assert samples.count("def f(x):\n    ") == 1 and samples.count("import os\n") == 1
    assert samples.index("def f(x):") < samples.index("import os")
    assert f"checkpoint   {workdir}/checkpoints/2 " in out
    assert os.path.getsize(os.path.join(workdir, "report.png")) > 1000


@pytest.mark.slow  # 65 s; the synthetic-data resume tests above run in the default suite
def test_resume_is_bit_identical_on_text_with_fim(tmp_path):
    straight_dir, resumed_dir = str(tmp_path / "a"), str(tmp_path / "b")
    train.run(_text_config(tmp_path, steps=4, checkpoint_every=2), straight_dir)
    train.run(_text_config(tmp_path, steps=2, checkpoint_every=2), resumed_dir)
    train.run(_text_config(tmp_path, steps=4, checkpoint_every=2), resumed_dir)
    losses = logged_losses(straight_dir)
    assert len(losses) == 4 and logged_losses(resumed_dir) == losses


@pytest.mark.slow  # 40 s on CI: the fixture model's train step compiled
def test_init_from_pretrained_weights_and_mismatch(tmp_path, fixture_dir, golden):
    import jax.numpy as jnp
    import numpy as np

    import ling_jax

    cfg = tiny_config(steps=1, init_from=str(fixture_dir), **{"schedule.peak_value": 0.0, "schedule.init_value": 0.0})
    cfg.model_overrides.update(dict(num_hidden_layers=3, vocab_size=512, max_position_embeddings=128))
    cfg.data.vocab_size = 512
    cfg.loss.balance_loss_weight = 0.0
    workdir = str(tmp_path / "ok")
    train.run(cfg, workdir)  # lr 0: the checkpoint holds the converted weights unchanged
    params = ling_jax.restore_params(os.path.join(workdir, "checkpoints", "1", "state"), params_key="params")
    model, _ = ling_jax.from_pretrained(str(fixture_dir))
    logits = model.apply({"params": params}, jnp.asarray(golden["forward_input_ids"]))
    np.testing.assert_allclose(logits, golden["forward_logits"], atol=2e-4)
    cfg.model_overrides.hidden_size = 32
    with pytest.raises(train.RunError, match="does not match the model"):
        train.run(cfg, str(tmp_path / "bad"))


@pytest.mark.slow  # 40 s: a train step and a decode loop compiled, programs executed
def test_code_tasks_at_eval_steps_log_pass_at_1(tmp_path):
    """config.eval.code_tasks: HumanEval executed at each evaluation, logged as eval/humaneval_pass@1."""
    from post_training_helpers import char_tokenizer_json

    src = tmp_path / "docs"
    src.mkdir()
    for i in range(8):
        (src / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    cfg = tiny_config(steps=2, eval_every=2, checkpoint_every=2, **{"eval.code_tasks": "humaneval",
                                                                   "eval.code_limit": 2})
    cfg.data.kind, cfg.data.path, cfg.data.add_eos = "text_dir", str(src), False  # the char tokenizer has no EOS
    cfg.data.tokenizer = str(char_tokenizer_json(tmp_path / "tokenizer.json"))
    train.run(cfg, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if "eval/humaneval_pass@1" in line]
    assert [r["step"] for r in rows] == [2] and rows[0]["eval/humaneval_pass@1"] == 0.0  # an untrained model
    assert "eval_loss" in rows[0]
    cfg.eval.code_tasks = "humaneval,mbpp"
    with pytest.raises(UserError, match="mbpp"):
        train.run(cfg, str(tmp_path / "bad"))
