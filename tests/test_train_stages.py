"""train.py on a staged mixture (config.stages, config.data.sources): the switch at the exact step, the learning
rate of the phase table, the boundary in the metrics, and resume bit-identical after kill -9 mid-stage and across
a boundary."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from test_faults import _wait_for
from train_helpers import ROOT, logged_losses, tiny_config

import train
from ling_jax.train import tasks
from ling_jax.train.optim import make_schedule

SOURCES = [dict(name="code", weight=3, sources=[dict(name="raw", weight=9, synthetic_seed=1),
                                                dict(name="other", weight=1, synthetic_seed=2)]),
           dict(name="text", weight=1, synthetic_seed=3)]
STAGES = [dict(name="warm", steps=3, mixture={"code": 3, "text": 1},
               schedule=[dict(kind="linear", steps=2, end=1e-3), dict(kind="constant")]),
          dict(name="anneal", steps=3, mixture={"code": 1, "text": 1, "code/raw": 1},
               schedule=dict(kind="inverse_sqrt", start=5e-4, end=1e-5))]


def staged_config(**changes):
    c = tiny_config(**changes)
    c.data.sources, c.stages = SOURCES, STAGES
    return c


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("staged") / "run")
    train.run(staged_config(checkpoint_every=2, eval_every=0), workdir)
    return workdir


def test_stage_switches_at_the_exact_step_with_the_phase_tables_learning_rate(staged_run):
    train_rows = {r["step"]: r for r in rows(staged_run) if "loss" in r}
    assert [train_rows[s]["data/stage"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert (train_rows[1]["stage"], train_rows[4]["stage"]) == ("warm", "anneal")
    assert "stage" not in train_rows[3] and "stage" not in train_rows[5]
    assert [train_rows[s]["learning_rate"] for s in (2, 3)] == pytest.approx([5e-4, 1e-3])  # linear, constant
    assert train_rows[4]["learning_rate"] == pytest.approx(5e-4)  # the anneal phase starts at its start
    assert train_rows[4]["data/target/text"] == pytest.approx(0.5)
    assert train_rows[4]["data/target/code/raw"] == pytest.approx(0.5)
    schedule = make_schedule(tasks.schedule_config(staged_config()))
    assert float(schedule(5)) == pytest.approx(train_rows[6]["learning_rate"])


@pytest.mark.slow  # 15 s; the kill -9 tests below cross a boundary too (slow)
def test_resume_from_mid_stage_crosses_the_boundary_bit_identically(staged_run, tmp_path):
    workdir = str(tmp_path / "resumed")
    shutil.copytree(staged_run, workdir)
    for step in ("4", "6"):  # the checkpoint of step 2 (mid-stage 1) is the latest left
        shutil.rmtree(os.path.join(workdir, "checkpoints", step))
    train.run(staged_config(checkpoint_every=2, eval_every=0), workdir)
    assert logged_losses(workdir) == logged_losses(staged_run)


def alternating_config(**changes):
    """`staged_config` with 134 stages of 3 steps (402 steps), alternating the two mixtures and phases."""
    c = staged_config(**changes)
    c.stages = [dict(STAGES[k % 2], name=f"{STAGES[k % 2]['name']}{k}") for k in range(134)]
    return c


@pytest.mark.slow
@pytest.mark.parametrize("offset", [1, 0])  # resume from mid-stage (1 step in), and from a stage's last step
def test_kill_9_resumes_bit_identically(offset, tmp_path):
    workdir = str(tmp_path / "run")
    code = ("import sys; sys.path.insert(0, 'tests'); import train, test_train_stages as t; "
            f"train.run(t.alternating_config(checkpoint_every=1, eval_every=0, steps=400), {workdir!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "8")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    start = max(s for s in saved if s % 3 == offset and s < saved[-1])  # a committed step before the last
    for step in saved:
        if step > start:
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    train.run(alternating_config(checkpoint_every=1, eval_every=0, steps=start + 4), workdir)  # crosses a boundary
    reference = str(tmp_path / "reference")
    train.run(alternating_config(checkpoint_every=1, eval_every=0, steps=start + 4), reference)
    resumed = {s: v for s, v in logged_losses(workdir).items() if s <= start + 4}
    assert resumed == logged_losses(reference)
