"""Local jsonl suites (`jsonl:PATH`, own records and MBPP's layout), task names, and their error messages."""

from __future__ import annotations

import json

import pytest

from ling_jax.evaluation.problems import Cut, Problem, TaskError, load_jsonl
from ling_jax.evaluation.sandbox import run_programs
from ling_jax.evaluation.tasks import load_tasks, split_names

OWN = {"task_id": "add", "prompt": "def add(a, b):\n", "tests": "def check(f):\n    assert f(1, 2) == 3\n",
       "entry_point": "add", "canonical_solution": "    return a + b\n"}
MBPP = {"task_id": 11, "text": "Write a function to double a number.", "code": "def double(x):\n    return 2 * x",
        "test_list": ["assert double(2) == 4", "assert double(0) == 0"]}


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_both_layouts_load_and_their_references_pass(tmp_path):
    path = _write(tmp_path / "suite.jsonl", [OWN, "", MBPP])
    problems = load_tasks(f"jsonl:{path}")[f"jsonl:{path}"]
    assert [p.task_id for p in problems] == ["add", "11"]
    own, mbpp = problems
    assert own.entry_point == "add" and mbpp.entry_point is None
    assert mbpp.prompt == '"""\nWrite a function to double a number.\nassert double(2) == 4\n"""\n'
    results = run_programs([p.program(p.reference) for p in problems] + [own.program("    return a - b\n")])
    assert [r.passed for r in results] == [True, True, False]


def test_malformed_files_name_the_line(tmp_path):
    with pytest.raises(TaskError, match="no such file"):
        load_jsonl(tmp_path / "absent.jsonl", "jsonl:absent")
    with pytest.raises(TaskError, match="holds no record"):
        load_jsonl(_write(tmp_path / "empty.jsonl", [""]), "t")
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not JSON"):
        load_jsonl(_write(tmp_path / "bad.jsonl", [OWN, "{oops"]), "t")
    with pytest.raises(TaskError, match=r"keys.jsonl:1: a record needs 'task_id', 'prompt' and 'tests'"):
        load_jsonl(_write(tmp_path / "keys.jsonl", [{"prompt": "x"}]), "t")
    with pytest.raises(TaskError, match=r"list.jsonl:1: expected a JSON object"):
        load_jsonl(_write(tmp_path / "list.jsonl", [[1, 2]]), "t")
    with pytest.raises(TaskError, match="entry_point"):
        load_jsonl(_write(tmp_path / "entry.jsonl", [{**OWN, "entry_point": "not valid"}]), "t")
    with pytest.raises(TaskError, match="test_list"):
        load_jsonl(_write(tmp_path / "mbpp.jsonl", [{**MBPP, "test_list": []}]), "t")
    with pytest.raises(TaskError, match=r"dup.jsonl:2: task_id 'add' appears twice"):
        load_jsonl(_write(tmp_path / "dup.jsonl", [OWN, OWN]), "t")


def test_task_names_and_limit():
    assert split_names("humaneval, humaneval_infill_single,humaneval") == ["humaneval", "humaneval_infill_single"]
    with pytest.raises(TaskError, match="names no task"):
        split_names(" , ")
    with pytest.raises(TaskError, match=r"unknown task 'mbpp'.*jsonl:PATH"):
        load_tasks("humaneval,mbpp")
    with pytest.raises(TaskError, match="--limit must be >= 1"):
        load_tasks("humaneval", 0)
    assert [p.task_id for p in load_tasks("humaneval", 2)["humaneval"]] == ["HumanEval/0", "HumanEval/1"]


def test_cutting_generated_text():
    p = Problem("t", "x", "def f():\n", "")
    assert p.cut_text("    return 1\ndef g():\n    pass") == "    return 1"
    assert p.cut_text("    return 1\n\nif __name__ == '__main__':\n") == "    return 1\n"
    assert p.cut_text("    return 1\n```\n") == "    return 1"
    line = Problem("t", "x", "", "", suffix="", cut=Cut.FIRST_LINE)
    assert line.cut_text("    a = 1\n    b = 2\n") == "    a = 1\n" and line.cut_text("    a = 1") == "    a = 1\n"
    lines = Problem("t", "x", "", "", suffix="", cut=Cut.LINES)
    assert lines.cut_text("    a = 1\n    b = 2") == "    a = 1\n    b = 2\n"


def test_standalone_programs_keep_the_prompt_imports():
    p = Problem("t", "x", "from typing import List\nimport math\n\ndef f(xs: List[int]) -> int:\n    '''doc'''\n",
                "def check(g):\n    assert g([4]) == 2\n", "f")
    program = p.program("def f(xs):\n    return int(math.sqrt(xs[0]))\n", standalone=True)
    assert program.startswith("from typing import List\nimport math\ndef f(xs):")
    assert run_programs([program])[0].passed
