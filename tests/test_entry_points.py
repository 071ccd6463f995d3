"""The console entry points of setup.cfg: each names a real function, and every `--help` exits 0 with defaults."""

from __future__ import annotations

import configparser
import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_the_documented_commands_are_entry_points():
    assert set(_scripts()) == {"ling-train", "ling-convert", "ling-generate", "ling-eval", "ling-curate", "ling-plan"}


@pytest.mark.parametrize(("name", "shown"), [
    ("ling-generate", ["default: the checkpoint's generation_config.json", "(default: bfloat16)", "--chat-kwargs"]),
    ("ling-convert", ["{hf-to-jax,jax-to-hf}"]),
    ("ling-eval", ["--tasks"]),
    ("ling-plan", ["(default: none, as train.py's config.remat)", "(default: v5p)", "(default: float32)"]),
])
def test_argparse_commands_help_exits_0_with_defaults(name, shown, capsys):
    module, func = _scripts()[name].split(":")
    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), func)(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and out.startswith("usage:")
    for text in shown:
        assert text in out, (text, out)


@pytest.mark.parametrize("name", ["ling-train", pytest.param("ling-curate", marks=pytest.mark.slow)])
def test_absl_commands_help_exits_0_and_lists_their_flags(name):
    module, func = _scripts()[name].split(":")
    code = f"import sys; sys.argv = [{name!r}, '--help']; from {module} import {func}; {func}()"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "--config: " in res.stdout and "(default: 'None')" in res.stdout, res.stdout
