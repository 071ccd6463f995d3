"""The harness is right before any model is: task counts, canonical solutions and ground-truth middles pass,
empty / wrong / truncated completions fail."""

from __future__ import annotations

import pytest

from ling_jax.evaluation.humaneval import humaneval, multi_line_infilling, single_line_infilling
from ling_jax.evaluation.problems import Cut
from ling_jax.evaluation.sandbox import FailureKind, run_programs
from ling_jax.evaluation.tasks import Builtin, load_tasks


def test_task_counts_are_the_published_ones():
    counts = {name: len(problems) for name, problems in load_tasks([b.value for b in Builtin]).items()}
    assert counts == {"humaneval": 164, "humaneval_infill_single": 1033, "humaneval_infill_multi": 5815}
    for problems in (single_line_infilling(), multi_line_infilling()):
        assert len({p.task_id for p in problems}) == len(problems)


def test_infilling_tasks_reassemble_the_canonical_program():
    full = {p.task_id: p.prompt + p.reference for p in humaneval()}
    single = single_line_infilling()
    assert single[0].task_id == "SingleLineInfilling/HumanEval/0/L0" and single[0].cut is Cut.FIRST_LINE
    for p in single[:50] + multi_line_infilling()[:200]:
        he_id = "HumanEval/" + p.task_id.split("/")[2]
        assert p.prompt + p.reference + p.suffix == full[he_id]
        assert p.reference.strip() and p.reference.endswith("\n")
    multi = [p for p in multi_line_infilling() if p.task_id.startswith("MultiLineInfilling/HumanEval/0/")]
    assert [p.task_id.split("/")[-1] for p in multi][:3] == ["L0_L0", "L0_L1", "L0_L2"]


def test_canonical_solutions_pass_all_164():
    problems = humaneval()
    results = run_programs([p.program(p.reference) for p in problems], workers=2)
    failed = [(p.task_id, r.kind, r.message) for p, r in zip(problems, results, strict=True) if not r.passed]
    assert not failed and len(results) == 164


def test_empty_wrong_and_truncated_completions_fail():
    problems = humaneval()[:20]
    programs = []
    for p in problems:
        body = p.reference.rstrip("\n").splitlines()
        programs += [p.program(""), p.program("    return None\n"), p.program("\n".join(body[: len(body) // 2]) +
                                                                             "\n    return 0\n" if body else "")]
    results = run_programs(programs, workers=2)
    assert not any(r.passed for r in results)
    kinds = {r.kind for r in results}
    assert FailureKind.SYNTAX in kinds and FailureKind.ASSERTION in kinds  # empty body; wrong answer


def test_infilling_ground_truths_pass_a_sample_and_holes_fail():
    single, multi = single_line_infilling()[::40], multi_line_infilling()[::200]
    problems = single + multi
    truths = run_programs([p.program(p.cut_text(p.reference)) for p in problems], workers=2)
    assert all(r.passed for r in truths), [(p.task_id, r.message) for p, r in zip(problems, truths, strict=True)
                                          if not r.passed]
    empty = run_programs([p.program(p.cut_text("")) for p in problems[:15]], workers=2)
    assert sum(r.passed for r in empty) <= 2  # a blank line where a statement was: almost always wrong


@pytest.mark.slow  # 6,848 programs: about 4 minutes on 2 workers
def test_every_infilling_ground_truth_passes():
    problems = single_line_infilling() + multi_line_infilling()
    results = run_programs([p.program(p.cut_text(p.reference)) for p in problems], workers=2)
    failed = [p.task_id for p, r in zip(problems, results, strict=True) if not r.passed]
    assert not failed and len(results) == 6848
