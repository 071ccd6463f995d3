"""`ling_jax.command_line`: mistakes on the command lines of `train.py` and `python -m ling_jax.curation`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(*args):
    out = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stdout, out.stderr


def test_command_line_mistakes_exit_2_in_one_line_without_traceback(tmp_path):
    """What users typed wrong in the issue: each is one `error:` line, exit status 2, no traceback, no workdir."""
    workdir = str(tmp_path / "w")
    cases = [
        (["--config", "configs/nope.py", "--workdir", workdir],
         "error: --config configs/nope.py: cannot load it ([Errno 2] No such file or directory"),
        (["--config", "configs/demo.py", "--workdir", workdir, "--config.data.fim_ratee=0.5"],
         "error: --config.data.fim_ratee: configs/demo.py has no such field; did you mean --config.data.fim_rate"),
        (["--config", "configs/demo.py", "--workdir", workdir, "--config.compute_dtype=float64"],
         "error: config.compute_dtype='float64': not a DType; use one of float32, bfloat16"),
    ]
    for args, expected in cases:
        code, _, err = _train(*args)
        assert code == 2, (args, err)
        assert expected in err, (args, err)
        assert "Traceback" not in err, (args, err)
    assert not os.path.exists(workdir)
    code, out, _ = _train("--help")
    assert code == 0 and "python train.py --config configs/demo.py --workdir" in out


def test_curation_command_line_mistakes_exit_2():
    out = subprocess.run([sys.executable, "-m", "ling_jax.curation", "--config", "configs/curate_code.py",
                          "--config.inptu=/tmp", "--config.output=/tmp/nowhere"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: --config.inptu: configs/curate_code.py has no such field; did you mean --config.input?" in out.stderr


@pytest.mark.slow  # three more train.py processes
def test_more_train_py_mistakes_exit_2(tmp_path):
    workdir = str(tmp_path / "w")
    for args, expected in [
        (["--config", "configs/demo.py", "--workdir", workdir, "--config.steps=abc"],
         "error: flag --config.steps=abc: invalid literal for int()"),
        (["--config", "configs/demo.py", "--workdir", workdir, "--config.steps=-3"],
         "error: config.steps=-3: must be >= 1"),
        (["--config", "configs/demo.py"], "error: --workdir is required"),
        (["--config", "configs/demo.py:after", "--workdir", workdir],
         "Error whilst parsing config file: ValueError: configs/demo.py takes no argument or 'before'; got 'after'"),
    ]:
        code, _, err = _train(*args)
        assert code == 2 and expected in err and "Traceback" not in err, (args, err)
    assert not os.path.exists(workdir)
