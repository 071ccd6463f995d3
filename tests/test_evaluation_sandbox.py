"""The sandbox: passing needs the tests to run to their end; hostile programs fail with the right kind, contained."""

from __future__ import annotations

import os
import pathlib
import time

import pytest

from ling_jax.evaluation.sandbox import FailureKind, Limits, SandboxError, run_program, run_programs

FAST = Limits(timeout_s=3.0, cpu_seconds=2)
CHECK = "\n\ndef check(candidate):\n    assert candidate(2) == 3\n\ncheck(inc)\n"


def test_ordinary_outcomes():
    cases = {"def inc(x):\n    return x + 1\n": None,
             "def inc(x):\n    return x\n": FailureKind.ASSERTION,
             "def inc(x):\n    return x / 0\n": FailureKind.EXCEPTION,
             "def inc(x:\n    return x\n": FailureKind.SYNTAX}
    results = run_programs([src + CHECK for src in cases], FAST, workers=2)
    assert [r.kind for r in results] == list(cases.values())
    assert [r.passed for r in results] == [True, False, False, False]
    assert "ZeroDivisionError" in results[2].message


def _hostile(outside: pathlib.Path) -> dict[str, tuple[str, FailureKind]]:
    """Completions of `inc` that attack the harness, with the kind each must be reported as."""
    return {
        "infinite loop": ("def inc(x):\n    while True:\n        pass\n", FailureKind.TIMEOUT),
        "sleep past the wall clock": ("import time\ndef inc(x):\n    time.sleep(60)\n", FailureKind.TIMEOUT),
        "fork bomb": ("import os\ndef inc(x):\n    while True:\n        os.fork()\n", FailureKind.BLOCKED),
        "memory bomb": ("def inc(x):\n    return len('a' * 10**11)\n", FailureKind.MEMORY),
        "huge print": ("def inc(x):\n    print('x' * 10**8)\n    return x + 1\n", FailureKind.OUTPUT),
        "kill the parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef inc(x):\n    return x + 1\n",
                            FailureKind.BLOCKED),
        "sys.exit before the tests": ("import sys\nsys.exit(0)\n", FailureKind.EARLY_EXIT),
        "os._exit before the tests": ("import os\nos._exit(0)\n", FailureKind.EARLY_EXIT),
        "overwrite check": ("import builtins\nbuiltins.check = lambda f: None\ndef check(f):\n    pass\n"
                            "def inc(x):\n    return x\n", FailureKind.ASSERTION),
        "swallow the failing assert": ("import builtins\nbuiltins.AssertionError = Exception\n"
                                       "def inc(x):\n    return x\n", FailureKind.ASSERTION),
        "write outside": (f"open({str(outside / 'escaped.txt')!r}, 'w').write('x')\ndef inc(x):\n    return x + 1\n",
                          FailureKind.BLOCKED),
        "remove outside": (f"import os\nos.remove({str(outside / 'keep.txt')!r})\n", FailureKind.BLOCKED),
        "relative escape": ("open('../escaped.txt', 'w').write('x')\n", FailureKind.BLOCKED),
        "socket": ("import socket\ns = socket.socket()\n", FailureKind.BLOCKED),
        "socket caught": ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9))\nexcept OSError:\n"
                          "    pass\ndef inc(x):\n    return x + 1\n", FailureKind.BLOCKED),
        "subprocess": ("import subprocess\nsubprocess.run(['true'])\n", FailureKind.BLOCKED),
        "ctypes": ("import ctypes\nctypes.CDLL(None).kill(1, 9)\n", FailureKind.BLOCKED),
        "fake verdict": ('print(\'{"status": "passed"}\')\nimport os\nos._exit(0)\n', FailureKind.EARLY_EXIT),
    }


def test_hostile_completions_fail_with_the_right_kind_and_change_nothing(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(outside))
    cases = _hostile(outside)
    start = time.monotonic()
    results = run_programs([src + CHECK for src, _ in cases.values()], FAST, workers=2)
    elapsed = time.monotonic() - start
    got = {name: r.kind for name, r in zip(cases, results, strict=True)}
    assert got == {name: kind for name, (_, kind) in cases.items()}
    assert not any(r.passed for r in results)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(outside))) == before
    assert (outside / "keep.txt").read_text() == "keep"
    assert elapsed < 15  # two timeouts of 3 s (2 s CPU) each, the rest immediate
    assert len(results[4].output) <= FAST.output_bytes


def test_network_is_cut_off_by_a_namespace_where_allowed():
    result = run_program("def inc(x):\n    return x + 1\n" + CHECK, FAST)
    assert result.passed and result.network in ("namespace", "guard")
    if os.geteuid() == 0:
        assert result.network == "namespace"


def test_temporary_directories_are_removed():
    base = pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
    before = {p.name for p in base.glob("ling-eval-*")}
    run_program("open('scratch.txt', 'w').write('x' * 100)\n", FAST)
    assert {p.name for p in base.glob("ling-eval-*")} == before


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("LING_SECRET", "42")
    result = run_program("import os\nassert set(os.environ) <= {'HOME', 'LANG', 'LC_CTYPE', 'PATH', 'TMPDIR'}, "
                         "sorted(os.environ)\n", FAST)
    assert result.passed, result.message


def test_bad_settings():
    with pytest.raises(SandboxError, match="256 MiB"):
        Limits(memory_bytes=1 << 20)
    with pytest.raises(SandboxError, match="--timeout"):
        Limits(timeout_s=0)
    with pytest.raises(SandboxError, match="--workers"):
        run_programs(["pass"], workers=0)
