"""Task names: the built-in benchmarks and `jsonl:PATH`, parsed and loaded before any model work.

`--tasks humaneval,humaneval_infill_single,jsonl:/data/mbpp.jsonl` names tasks separated by
commas; `parse_tasks` checks every name (and that every jsonl file exists and parses) and
`load_tasks` returns the problems of each, the first `limit` of each when a limit is given.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from ling_jax.evaluation import humaneval
from ling_jax.evaluation.problems import Problem, TaskError, load_jsonl

JSONL_PREFIX = "jsonl:"


class Builtin(enum.Enum):
    """The built-in tasks, by the name `--tasks` takes."""

    HUMANEVAL = "humaneval"
    HUMANEVAL_INFILL_SINGLE = "humaneval_infill_single"
    HUMANEVAL_INFILL_MULTI = "humaneval_infill_multi"

    def problems(self) -> list[Problem]:
        """Every problem of the task."""
        load = {Builtin.HUMANEVAL: humaneval.humaneval,
                Builtin.HUMANEVAL_INFILL_SINGLE: humaneval.single_line_infilling,
                Builtin.HUMANEVAL_INFILL_MULTI: humaneval.multi_line_infilling}[self]
        return load(self.value)


def split_names(spec: str | Sequence[str]) -> list[str]:
    """Task names from `a,b,c` (or a list of such strings), in order, without repeats.

    Raises:
      TaskError: no task at all.
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    names = []
    for part in parts:
        for name in (p.strip() for p in part.split(",")):
            if name and name not in names:
                names.append(name)
    if not names:
        raise TaskError(f"--tasks {spec!r} names no task; give e.g. --tasks humaneval")
    return names


def load_task(name: str) -> list[Problem]:
    """The problems of one task name.

    Raises:
      TaskError: an unknown name, or a jsonl task whose file is missing or malformed.
    """
    if name.startswith(JSONL_PREFIX):
        return load_jsonl(name[len(JSONL_PREFIX):], name)
    try:
        return Builtin(name).problems()
    except ValueError:
        known = ", ".join(b.value for b in Builtin)
        raise TaskError(f"unknown task {name!r} in --tasks: choose from {known}, or jsonl:PATH") from None


def load_tasks(spec: str | Sequence[str], limit: int | None = None) -> dict[str, list[Problem]]:
    """{task name: its problems (the first `limit` of them)} for every task of `spec`.

    Raises:
      TaskError: as `split_names` and `load_task`, or a limit below 1.
    """
    if limit is not None and limit < 1:
        raise TaskError(f"--limit must be >= 1 (or unset for every problem), got {limit}")
    return {name: load_task(name)[:limit] for name in split_names(spec)}
