"""A one-picture report of a training run: losses, learning rate, throughput and expert load.

Usage::

    python -m ling_jax.cli.report RUN_DIR [--out FILE] [--title TEXT]

It reads `RUN_DIR/metrics.jsonl`, one JSON object per logged step with the keys
`step`, `loss`, `learning_rate`, `grad_norm`, `tokens_per_second`, `mfu`, and
optionally `eval_loss`, `eval/<task>_pass@1` (code scores of the eval steps,
`ling_jax.evaluation.code_scores`) and `expert_load` (a list over MoE layers of lists over
experts of the fraction of routed tokens per expert), and writes a PNG
(default `RUN_DIR/report.png`) with:

* loss (and eval loss; code pass@1 per task on a right-hand axis) vs step, learning rate vs step, gradient norm vs step,
  tokens/s and MFU vs step; the first step of each stage (records with a `stage` name, `config.stages`) as a
  dashed vertical line labelled with the stage on every panel;
* one heatmap per MoE layer, experts x steps, coloured by load relative to
  uniform (fraction * E) on a log scale symmetric about 1: white = balanced,
  red = overloaded, blue = starved.

Malformed lines (not JSON, not an object, no integer `step`) are skipped with a
warning on stderr: a run killed mid-write leaves a truncated last line, and the
report of such a run is exactly what one wants. When a step is logged more than
once (its training row and its eval row; a resumed run re-logs the steps after
its last checkpoint), the records are merged, later keys winning.
`expert_load` entries whose shape differs from the first one are dropped with a
warning. A missing key just leaves its panel empty.

Exit status: 0 on success; 1 (message on stderr) for a missing run directory,
a missing or empty `metrics.jsonl`, no valid record, or an unwritable output;
2 for bad command-line arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colors
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ling_jax.config import UserError

METRICS_FILE = "metrics.jsonl"
DEFAULT_OUT = "report.png"
EXIT_OK = 0
EXIT_ERROR = 2  # bad input: a missing run directory or metrics file, an output directory that is not there
HEATMAP_COLUMNS = 4  # MoE-layer panels per row
MAX_LOAD_RATIO = 16.0  # the expert-load colour scale spans at most [1/16, 16] x uniform
CODE_EVAL_PREFIX, CODE_EVAL_SUFFIX = "eval/", "_pass@1"  # code scores train.py logs at its eval steps
CODE_EVAL_COLORS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


class ReportError(UserError):
    """A run directory or metrics file the report cannot use."""


def _warn(message: str) -> None:
    print(f"report: warning: {message}", file=sys.stderr)


def read_metrics(run_dir: pathlib.Path) -> list[dict[str, Any]]:
    """The records of `run_dir/metrics.jsonl`, one per step, sorted by step.

    Malformed lines are skipped with a warning on stderr; records sharing a
    step are merged (a later record's keys win).

    Args:
      run_dir: the run directory.

    Returns:
      The records (dicts with at least an integer `step`).

    Raises:
      ReportError: missing directory or file, empty file, or no valid record.
    """
    if not run_dir.is_dir():
        raise ReportError(f"no such run directory: {run_dir}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"no {METRICS_FILE} in {run_dir}")
    by_step: dict[int, dict[str, Any]] = {}
    lines = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            lines += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                _warn(f"{path}:{number}: skipped, not JSON ({e.msg})")
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, bool) or not isinstance(step, int):
                _warn(f"{path}:{number}: skipped, not an object with an integer 'step'")
                continue
            by_step[step] = {**by_step.get(step, {}), **record}
    if not lines:
        raise ReportError(f"{path} is empty")
    if not by_step:
        raise ReportError(f"{path} has no valid record ({lines} lines skipped)")
    return [by_step[s] for s in sorted(by_step)]


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records whose `key` is a finite number."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool) and math.isfinite(r[key])]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def expert_load_matrix(records: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps [S], load [L, E, S]) from the records' `expert_load`; None when no record has one."""
    steps, loads, shape = [], [], None
    for r in records:
        if r.get("expert_load") is None:
            continue
        try:
            load = np.asarray(r["expert_load"], np.float64)
        except (TypeError, ValueError):
            load = np.zeros(0)
        if load.ndim != 2 or load.size == 0 or (shape is not None and load.shape != shape):
            _warn(f"step {r['step']}: expert_load of shape {load.shape} dropped"
                  + (f" (expected {shape})" if shape else ""))
            continue
        shape = load.shape
        steps.append(r["step"])
        loads.append(load)
    if not loads:
        return None
    return np.asarray(steps, np.float64), np.stack(loads, axis=-1)


def _edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (midpoints; half a gap beyond the ends)."""
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    mid = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - mid[0]], mid, [2 * centers[-1] - mid[-1]]])


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def _line(ax: Axes, records: Sequence[dict[str, Any]], key: str, label: str, **style: Any) -> bool:
    steps, values = series(records, key)
    if not len(steps):
        return False
    ax.plot(steps, values, label=label, **style)
    return True


def code_eval_keys(records: Sequence[dict[str, Any]]) -> list[str]:
    """The `eval/<task>_pass@1` keys (code scores of train.py's eval steps) found in the records, sorted."""
    return sorted({k for r in records for k in r if k.startswith(CODE_EVAL_PREFIX) and k.endswith(CODE_EVAL_SUFFIX)})


def _plot_code_scores(loss_ax: Axes, records: Sequence[dict[str, Any]]) -> None:
    """Code pass@1 of the eval steps on a right-hand axis of the loss panel, one line per task."""
    keys = code_eval_keys(records)
    if not keys:
        return
    code_ax = loss_ax.twinx()
    for i, key in enumerate(keys):
        task = key[len(CODE_EVAL_PREFIX): -len(CODE_EVAL_SUFFIX)]
        color = CODE_EVAL_COLORS[i % len(CODE_EVAL_COLORS)]  # apart from the loss lines' blue and orange
        _line(code_ax, records, key, f"{task} pass@1", lw=1.5, ls=":", marker="s", ms=4, color=color)
    code_ax.set_ylim(-0.02, 1.02)
    code_ax.set_ylabel("code pass@1 (eval steps)")
    code_ax.legend(loc="center right", fontsize=8)


def stage_starts(records: Sequence[dict[str, Any]]) -> list[tuple[int, str]]:
    """`(first step, name)` of every stage the records mark (`stage`, logged by train.py at a stage's first step)."""
    return [(r["step"], r["stage"]) for r in records if isinstance(r.get("stage"), str)]


def _mark_stages(axes: Sequence[Axes], records: Sequence[dict[str, Any]]) -> None:
    for step, name in stage_starts(records):
        for ax in axes:
            ax.axvline(step, color="gray", ls="--", lw=0.8)
            ax.annotate(name, (step, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=8, color="gray")


def _plot_curves(axes: Sequence[Axes], records: Sequence[dict[str, Any]]) -> None:
    loss_ax, lr_ax, gn_ax, tp_ax = axes
    has_loss = _line(loss_ax, records, "loss", "train loss", lw=1.0, color="tab:blue")
    has_eval = _line(loss_ax, records, "eval_loss", "eval loss", lw=1.5, color="tab:orange", marker="o", ms=3)
    if has_loss or has_eval:
        loss_ax.legend(loc="upper right")
    else:
        _no_data(loss_ax, "loss")
    _plot_code_scores(loss_ax, records)
    loss_ax.set_title("loss (and code pass@1)" if code_eval_keys(records) else "loss")

    if not _line(lr_ax, records, "learning_rate", "learning rate", color="tab:green"):
        _no_data(lr_ax, "learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.set_title("learning rate")

    if not _line(gn_ax, records, "grad_norm", "grad norm", lw=1.0, color="tab:purple"):
        _no_data(gn_ax, "grad norm")
    gn_ax.set_title("gradient global norm (before clipping)")

    has_tp = _line(tp_ax, records, "tokens_per_second", "tokens/s", color="tab:blue")
    mfu_ax = tp_ax.twinx()
    has_mfu = _line(mfu_ax, records, "mfu", "MFU", color="tab:red", ls="--")
    tp_ax.set_ylabel("tokens/s", color="tab:blue")
    mfu_ax.set_ylabel("MFU", color="tab:red")
    if not (has_tp or has_mfu):
        _no_data(tp_ax, "throughput")
    tp_ax.set_title("throughput")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _mark_stages(axes, records)


def _load_norm(rel: np.ndarray) -> colors.LogNorm:
    """A log colour scale symmetric about 1: [1/c, c], c a power of two in [2, MAX_LOAD_RATIO]."""
    finite = rel[np.isfinite(rel) & (rel > 0)]
    spread = float(np.max(np.maximum(finite, 1.0 / finite))) if finite.size else 2.0
    c = float(np.clip(2.0 ** math.ceil(math.log2(max(spread, 2.0))), 2.0, MAX_LOAD_RATIO))
    return colors.LogNorm(vmin=1.0 / c, vmax=c)


def _plot_expert_load(fig: Figure, steps: np.ndarray, load: np.ndarray) -> None:
    """One experts x steps panel per MoE layer, load relative to uniform on a log scale, one colour bar."""
    L, E, _ = load.shape
    norm = _load_norm(load * E)
    rel = np.clip(load * E, norm.vmin, norm.vmax)  # starved experts (0 tokens) show as the darkest blue
    x, y = _edges(steps), np.arange(E + 1) - 0.5
    cols = min(HEATMAP_COLUMNS, L)
    rows = math.ceil(L / cols)
    grid = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
    mesh = None
    for layer, ax in enumerate(grid.flat):
        if layer >= L:
            ax.set_visible(False)
            continue
        mesh = ax.pcolormesh(x, y, rel[layer], cmap="RdBu_r", norm=norm, shading="flat")
        ax.set_title(f"MoE layer {layer}", fontsize=9)
        ax.set_yticks(range(E) if E <= 16 else [0, E // 2, E - 1])
        ax.tick_params(labelsize=8, labelbottom=True)
        if layer % cols == 0:
            ax.set_ylabel("expert", fontsize=8)
        if layer + cols >= L:
            ax.set_xlabel("step", fontsize=8)
    ticks = [2.0**k for k in range(-int(math.log2(norm.vmax)), int(math.log2(norm.vmax)) + 1)]
    bar = fig.colorbar(mesh, ax=grid[:, -1].tolist(), ticks=ticks, fraction=0.05, pad=0.02)
    bar.ax.set_yticklabels([f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
    bar.ax.minorticks_off()
    bar.set_label("load / uniform share")
    fig.suptitle("expert load per MoE layer (red: overloaded, white: balanced, blue: starved)", fontsize=11)


def plot_report(records: Sequence[dict[str, Any]], out: pathlib.Path, title: str) -> None:
    """Draw the report of `records` (from `read_metrics`) into the PNG `out`."""
    experts = expert_load_matrix(records)
    curves_height = 7.5
    heat_height = 0.0
    if experts is not None:
        L, E = experts[1].shape[:2]
        heat_height = math.ceil(L / HEATMAP_COLUMNS) * min(3.0, max(2.4, 0.03 * E + 1.0)) + 0.6
    fig = Figure(figsize=(16, curves_height + heat_height), layout="constrained")
    if experts is None:
        top, bottom = fig, None
    else:
        top, bottom = fig.subfigures(2, 1, height_ratios=[curves_height, heat_height])
    _plot_curves(list(top.subplots(2, 2).flat), records)
    if bottom is not None:
        _plot_expert_load(bottom, *experts)
    summary = f"steps {records[0]['step']}–{records[-1]['step']}, {len(records)} records"
    losses = series(records, "loss")[1]
    if len(losses):
        summary += f", last loss {losses[-1]:.4f}"
    if experts is None:
        summary += " (no expert_load logged)"
    top.suptitle(f"{title}: {summary}", fontsize=13)
    fig.savefig(out, format="png", dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m ling_jax.cli.report",
                                     description="Plot a training run's metrics.jsonl into one PNG.")
    parser.add_argument("run_dir", type=pathlib.Path, help=f"run directory holding {METRICS_FILE}")
    parser.add_argument("--out", type=pathlib.Path, default=None, help=f"output PNG (default RUN_DIR/{DEFAULT_OUT})")
    parser.add_argument("--title", default=None, help="figure title (default: the run directory's name)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.run_dir / DEFAULT_OUT
    try:
        records = read_metrics(args.run_dir)
        if not out.parent.is_dir():
            raise ReportError(f"output directory does not exist: {out.parent}")
        plot_report(records, out, args.title or args.run_dir.resolve().name)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        print(f"report: error: cannot write {out}: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"wrote {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
