"""`python -m ling_jax.cli.report`: a PNG from a synthetic metrics.jsonl, and clear failures."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image

from ling_jax.cli.report import EXIT_ERROR, EXIT_OK, code_eval_keys, expert_load_matrix, main, read_metrics, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = pathlib.Path(__file__).resolve().parents[1]


def _records(steps: int = 20, layers: int = 2, experts: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(steps):
        load = rng.random((layers, experts)) + 0.1
        record = dict(step=i * 5, loss=6.0 * math.exp(-i / 10) + 2.0, learning_rate=1e-4 * min(1.0, i / 5),
                      grad_norm=1.0 + 0.1 * i, tokens_per_second=500.0 + i, mfu=0.4,
                      expert_load=(load / load.sum(-1, keepdims=True)).tolist())
        if i % 5 == 0:
            record["eval_loss"] = record["loss"] + 0.1
        out.append(record)
    return out


def _write(run: pathlib.Path, lines: list[str]) -> pathlib.Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def _is_png(path: pathlib.Path) -> bool:
    return path.read_bytes()[:8] == PNG_SIGNATURE


@pytest.fixture
def run_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return _write(tmp_path / "run", [json.dumps(r) for r in _records()])


def test_writes_png_to_default_and_custom_path(run_dir, tmp_path, capsys):
    assert main([str(run_dir)]) == EXIT_OK
    default = run_dir / "report.png"
    assert _is_png(default)
    height, width = image.imread(default).shape[:2]
    assert width == 1600 and height > 800
    out = tmp_path / "elsewhere.png"
    assert main([str(run_dir), "--out", str(out), "--title", "demo"]) == EXIT_OK
    assert _is_png(out)
    assert "wrote" in capsys.readouterr().out


def test_module_entry_point(run_dir, tmp_path):
    out = tmp_path / "cli.png"
    ok = subprocess.run([sys.executable, "-m", "ling_jax.cli.report", str(run_dir), "--out", str(out)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ok.returncode == EXIT_OK, ok.stderr
    assert _is_png(out)
    missing = subprocess.run([sys.executable, "-m", "ling_jax.cli.report", str(tmp_path / "nope")],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert missing.returncode == EXIT_ERROR
    assert "no such run directory" in missing.stderr


def test_missing_dir_file_and_empty(tmp_path, capsys):
    assert main([str(tmp_path / "absent")]) == EXIT_ERROR
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main([str(tmp_path / "run")]) == EXIT_ERROR
    assert "no metrics.jsonl" in capsys.readouterr().err
    _write(tmp_path / "run", ["", "   "])
    assert main([str(tmp_path / "run")]) == EXIT_ERROR
    assert "is empty" in capsys.readouterr().err
    _write(tmp_path / "run", ["not json", "[1, 2]", '{"loss": 1.0}', '{"step": "3"}'])
    assert main([str(tmp_path / "run")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "no valid record" in err and err.count("warning") == 4
    assert not (tmp_path / "run" / "report.png").exists()


def test_bad_output_directory_and_arguments(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--out", str(tmp_path / "missing" / "r.png")]) == EXIT_ERROR
    assert "output directory does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_malformed_lines_skipped_with_warning(tmp_path, capsys):
    lines = [json.dumps(r) for r in _records(steps=6)]
    lines.insert(2, "{broken")
    lines.append('{"step": 25, "loss": 1.')  # a run killed mid-write
    run = _write(tmp_path / "run", lines)
    assert len(read_metrics(run)) == 6
    assert main([str(run)]) == EXIT_OK
    err = capsys.readouterr().err
    assert "metrics.jsonl:3: skipped" in err and "metrics.jsonl:8: skipped" in err


def test_relogged_steps_keep_the_last_and_sort(tmp_path):
    lines = [json.dumps(dict(step=s, loss=float(s))) for s in (0, 10, 20, 10)]
    lines[-1] = json.dumps(dict(step=10, loss=-1.0))  # resumed run re-logs step 10
    records = read_metrics(_write(tmp_path / "run", lines))
    assert [r["step"] for r in records] == [0, 10, 20]
    assert records[1]["loss"] == -1.0


def test_expert_load_shape_mismatch_dropped(capsys):
    records = _records(steps=4, layers=2, experts=4)
    records[2]["expert_load"] = [[0.5, 0.5]]
    records[3]["expert_load"] = "garbage"
    steps, load = expert_load_matrix(records)
    assert list(steps) == [0, 5] and load.shape == (2, 4, 2)
    assert capsys.readouterr().err.count("dropped") == 2


def test_sparse_metrics_still_plot(tmp_path):
    # Only some keys, no expert_load, a NaN loss and a single record with eval loss.
    lines = [json.dumps(dict(step=0, loss=5.0)), json.dumps(dict(step=1, loss=float("nan"), eval_loss=4.0)),
             json.dumps(dict(step=2, learning_rate=1e-3))]
    run = _write(tmp_path / "run", lines)
    assert main([str(run)]) == EXIT_OK
    assert _is_png(run / "report.png")


def test_code_eval_rows_are_plotted(tmp_path):
    records = _records(steps=10)
    for r in records:
        if r.get("eval_loss") is not None:  # the eval steps also log code scores
            r["eval/humaneval_pass@1"] = 0.1 * r["step"] / 45
            r["eval/humaneval_infill_single_pass@1"] = 0.5
    assert code_eval_keys(records) == ["eval/humaneval_infill_single_pass@1", "eval/humaneval_pass@1"]
    steps, values = series(records, "eval/humaneval_pass@1")
    assert list(steps) == [0, 25] and values[1] == pytest.approx(0.1 * 25 / 45)
    run = _write(tmp_path / "run", [json.dumps(r) for r in records])
    assert main([str(run)]) == EXIT_OK
    with_code = image.imread(run / "report.png")
    plain = _write(tmp_path / "plain", [json.dumps(r) for r in _records(steps=10)])
    assert main([str(plain)]) == EXIT_OK
    assert with_code.shape == image.imread(plain / "report.png").shape
    assert not np.array_equal(with_code, image.imread(plain / "report.png"))  # the scores are drawn
