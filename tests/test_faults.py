"""Fault injection for `train.py`: damaged checkpoints, SIGTERM, kill -9 during a save, a full disk, data that
disappears, and the small-file mistakes of the issue. Nothing is lost: resumed losses equal an uninterrupted run's.

Every case runs several short training runs, so all are marked slow (CI runs them after the default suite).
"""

from __future__ import annotations

import glob
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
from post_training_helpers import char_tokenizer_json, chat_records, small_recipe, write_jsonl
from train_helpers import ROOT, logged_losses, tiny_config

import convert_weights
import ling_jax
import train
from configs import sft as sft_recipe
from ling_jax.io.integrity import MANIFEST, DamagedCheckpointError


def _reference(tmp_path, steps: int) -> dict[int, float]:
    """Losses of an uninterrupted run of `steps` steps (the schedule does not depend on `steps`)."""
    workdir = str(tmp_path / f"reference-{steps}")
    train.run(tiny_config(steps=steps, eval_every=0), workdir)
    return logged_losses(workdir)


def _biggest_file(step_dir: str) -> str:
    files = [f for f in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True)
             if os.path.isfile(f) and not f.endswith(MANIFEST)]
    return max(files, key=os.path.getsize)


@pytest.mark.slow  # 45 s: three short runs
def test_damaged_steps_are_moved_aside_and_the_run_resumes_from_an_intact_one(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    train.run(tiny_config(steps=3, checkpoint_every=1, eval_every=0), workdir)  # checkpoints 1, 2, 3
    ckpts = os.path.join(workdir, "checkpoints")
    assert all(os.path.isfile(os.path.join(ckpts, s, MANIFEST)) for s in ("1", "2", "3"))
    truncated = _biggest_file(os.path.join(ckpts, "3"))
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    deleted = _biggest_file(os.path.join(ckpts, "2"))
    os.remove(deleted)

    # from_pretrained and jax-to-hf name the damaged files instead of failing deep in TensorStore.
    with pytest.raises(DamagedCheckpointError, match=f"{os.path.basename(truncated)} has .* bytes"):
        ling_jax.from_pretrained(os.path.join(ckpts, "3"))
    assert convert_weights.main(["jax-to-hf", "--ckpt", os.path.join(ckpts, "2"), "--out", str(tmp_path / "hf")]) == 2
    assert f"{deleted} is missing" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf")

    train.run(tiny_config(steps=4, checkpoint_every=1, eval_every=0), workdir)
    out = capsys.readouterr().out
    assert "checkpoint step 3 is damaged" in out and "checkpoint step 2 is damaged" in out
    assert "resumed from the checkpoint at step 1" in out
    aside = sorted(os.listdir(os.path.join(workdir, "damaged_checkpoints")))
    assert [a.split("-")[0] for a in aside] == ["2", "3"]  # moved, never deleted
    assert os.path.isfile(os.path.join(workdir, "damaged_checkpoints", aside[1], os.path.relpath(
        truncated, os.path.join(ckpts, "3"))))
    # Steps 2 and 3 were logged twice; the later rows (the resumed run's) equal an uninterrupted run's.
    assert logged_losses(workdir) == _reference(tmp_path, 4)


@pytest.mark.slow  # 45 s: the fixture model's SFT compile
def test_small_sft_file_trains_without_eval_and_clamps_the_sample(tmp_path, fixture_dir, capsys):
    """The issue's first try: 64 conversations, 4 steps, eval_every 500, a 256-token sample on 128 positions."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(64))
    tok = char_tokenizer_json(tmp_path / "tokenizer.json")
    cfg = small_recipe(sft_recipe.get_config(), init_from=fixture_dir, data=data, tokenizer=tok, steps=2)
    cfg.eval_every, cfg.sample_tokens = 500, 256  # evaluation never runs within 2 steps
    cfg.sample_prompts = ("Write a function that checks whether a number is prime, with a docstring and tests.",)
    train.run(cfg, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "note: the end-of-run samples will have" in out and "not config.sample_tokens=256" in out
    assert "--- sample from the trained model ---" in out
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")


def _launch(workdir: str, *extra: str, steps: int = 400, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", "--config", "configs/default.py", "--workdir", workdir,
           f"--config.steps={steps}", "--config.checkpoint_every=3", "--config.log_every=1", "--config.eval_every=3",
           "--config.eval_batches=2", "--config.batch_size=4", "--config.seq_len=32",
           "--config.model_overrides.num_hidden_layers=2", "--config.model_overrides.vocab_size=256",
           "--config.model_overrides.max_position_embeddings=64", "--config.data.vocab_size=256",
           "--config.data.synthetic_num_docs=2000", "--config.peak_flops_per_device=1e11",
           "--config.loss.balance_loss_weight=0.01", "--config.loss.accumulation_steps=2", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 240, poll: float = 0.05) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(poll)


def _resume_and_compare(workdir: str, steps: int, tmp_path) -> None:
    """Resumes `workdir` to `steps` in this process; its losses must equal an uninterrupted run's."""
    train.run(tiny_config(steps=steps, eval_every=0), workdir)
    assert logged_losses(workdir) == _reference(tmp_path, steps)


@pytest.mark.slow
def test_sigterm_saves_commits_and_exits_0_then_resumes_bit_identically(tmp_path):
    workdir = str(tmp_path / "run")
    proc = _launch(workdir)
    _wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "3")), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = int(out.split("preempted: stopped after step ")[1].split(";")[0])
    assert stopped >= 3 and os.path.isfile(os.path.join(workdir, "checkpoints", str(stopped), MANIFEST))
    assert max(logged_losses(workdir)) == stopped
    _resume_and_compare(workdir, stopped + 2, tmp_path)


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_loses_nothing(tmp_path):
    workdir = str(tmp_path / "run")
    ckpts = os.path.join(workdir, "checkpoints")
    proc = _launch(workdir)
    _wait_for(lambda: os.path.isdir(os.path.join(ckpts, "3")), proc)
    _wait_for(lambda: bool(glob.glob(os.path.join(ckpts, "*.orbax-checkpoint-tmp*"))), proc, poll=0.002)
    proc.kill()
    proc.communicate()
    committed = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert committed, "no committed checkpoint"
    _resume_and_compare(workdir, committed[-1] + 4, tmp_path)  # past the step whose write was cut
    assert not glob.glob(os.path.join(ckpts, "*.orbax-checkpoint-tmp*"))


@pytest.mark.slow
def test_full_disk_fails_the_save_cleanly_and_the_committed_step_survives(tmp_path):
    workdir = str(tmp_path / "run")
    train.run(tiny_config(steps=3), workdir)  # checkpoint 3

    def small_files():  # files may not grow past 256 KB: a checkpoint's arrays cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    proc = _launch(workdir, "--config.schedule.decay_steps=100", steps=6, preexec_fn=small_files)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    # Orbax and TensorStore log the failed write from their threads; the run's own verdict is the last line.
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: writing a checkpoint in") and "the newest committed checkpoint is step 3" in last
    _resume_and_compare(workdir, 6, tmp_path)


@pytest.mark.slow
def test_a_data_file_that_disappears_stops_the_run_and_resume_is_exact(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    for i in range(12):
        (src / f"doc{i:02d}.txt").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n")  # ~3 steps a pass
    tok = char_tokenizer_json(tmp_path / "tokenizer.json")
    data_flags = ["--config.data.kind=text_dir", f"--config.data.path={src}", "--config.data.file_pattern=*.txt",
                  f"--config.data.tokenizer={tok}", "--config.data.add_eos=false"]  # the char tokenizer has no EOS

    def config(steps):
        c = tiny_config(steps=steps, eval_every=0)
        c.data.kind, c.data.path, c.data.file_pattern, c.data.tokenizer = "text_dir", str(src), "*.txt", str(tok)
        c.data.add_eos = False
        return c

    workdir = str(tmp_path / "run")
    proc = _launch(workdir, *data_flags)
    _wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "3")), proc)
    gone = src / "doc05.txt"
    kept = gone.read_bytes()
    gone.unlink()
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    assert f"error: {gone} of directory" in err and "disappeared during the run" in err and "Traceback" not in err

    with pytest.raises(ling_jax.config.UserError, match="the data changed since the checkpoint was written: it "
                                                        "was 12 documents, it is 11 documents"):
        train.run(config(1000), workdir)  # resuming onto other data is refused too
    gone.write_bytes(kept)
    committed = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    train.run(config(committed + 3), workdir)
    reference = str(tmp_path / "reference")
    train.run(config(committed + 3), reference)
    assert logged_losses(workdir) == logged_losses(reference)
