"""A code problem (prompt, tests, how to cut a completion) and the local jsonl suites (`jsonl:PATH`).

A `Problem` is what every task yields: the text the model continues (`prompt`; for infilling the
text before the hole, with `suffix` after it), the test code, and `program(completion)`, the
source the sandbox runs: prompt + completion (+ suffix) + tests (+ `check(entry_point)`).

`load_jsonl` reads a local file, one JSON object a line, in either layout:

* `{"task_id", "prompt", "tests"[, "entry_point"][, "canonical_solution"]}`: the model completes
  `prompt`; `tests` follow the completion; with `entry_point` a `check(<entry_point>)` call is added
  (HumanEval's convention: `tests` defines `check(candidate)`);
* MBPP's `{"text", "code", "test_list"[, "task_id"][, "test_setup_code"]}`: the prompt is the
  description and the first test in a docstring (as in the MBPP paper), the tests are the asserts.

Blank lines are skipped; any other line that is not such a record is an error naming the line.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import pathlib

from ling_jax.config import UserError

# The stop sequences of the Codex paper's HumanEval runs, plus decorators and a closing code fence.
COMPLETION_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
COMPLETION_TOKENS = 512  # new tokens of a completion task (HumanEval, jsonl)


class TaskError(UserError):
    """A task that cannot be run: unknown name, missing or malformed task file."""


class PromptMode(enum.Enum):
    """How the model sees a problem."""

    COMPLETE = "complete"  # continue `prompt`
    INFILL = "infill"  # fill the hole between `prompt` and `suffix` (FIM sentinels)


class Cut(enum.Enum):
    """How generated text becomes the completion."""

    STOP = "stop"  # up to the first stop sequence
    LINES = "lines"  # whole lines: ends with a newline
    FIRST_LINE = "first_line"  # one line: up to and including the first newline


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of a task.

    Attributes:
      task: the task name (`humaneval`, `jsonl:PATH`, ...).
      task_id: its id within the task.
      prompt: the text the model continues (infilling: the text before the hole).
      tests: test code run after the solution.
      entry_point: the function `check` is called with (None: `tests` are plain statements).
      reference: a known-good completion (the canonical solution or the masked middle; "" if none).
      suffix: infilling: the text after the hole (None for completion tasks).
      stop: stop sequences (with `Cut.STOP`).
      cut: how generated text is cut.
      max_new_tokens: new tokens to generate.
    """

    task: str
    task_id: str
    prompt: str
    tests: str
    entry_point: str | None = None
    reference: str = ""
    suffix: str | None = None
    stop: tuple[str, ...] = COMPLETION_STOPS
    cut: Cut = Cut.STOP
    max_new_tokens: int = COMPLETION_TOKENS

    @property
    def mode(self) -> PromptMode:
        """INFILL when the problem has a suffix, else COMPLETE."""
        return PromptMode.COMPLETE if self.suffix is None else PromptMode.INFILL

    def program(self, completion: str, *, standalone: bool = False) -> str:
        """The source the sandbox runs for `completion`.

        Args:
          completion: the model's text for the hole or continuation (already cut).
          standalone: the completion is a whole program (a chat reply defining the function): only
            the prompt's import lines go before it.
        """
        if standalone:
            imports = [line for line in self.prompt.splitlines() if line.startswith(("import ", "from "))]
            head = "\n".join(imports) + "\n" + completion
        else:
            head = self.prompt + completion + (self.suffix or "")
        check = f"\ncheck({self.entry_point})\n" if self.entry_point else "\n"
        return head + "\n\n" + self.tests + check

    def cut_text(self, text: str) -> str:
        """The completion from generated text (see `Cut`)."""
        if self.cut is Cut.FIRST_LINE:
            return text.split("\n", 1)[0] + "\n"
        if self.cut is Cut.LINES:
            return text if text.endswith("\n") else text + "\n"
        at = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        return text[:at]


def _record(value: object, where: str, task: str, index: int) -> Problem:
    """A `Problem` from one parsed line of a jsonl suite."""
    if not isinstance(value, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(value).__name__}")
    if {"prompt", "tests"} <= value.keys():
        for key in ("task_id", "prompt", "tests"):
            if not isinstance(value.get(key), str):
                raise TaskError(f"{where}: {key!r} must be a string, got {value.get(key)!r:.60}")
        entry = value.get("entry_point")
        if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
            raise TaskError(f"{where}: 'entry_point' must be a Python identifier, got {entry!r:.60}")
        return Problem(task, value["task_id"], value["prompt"], value["tests"], entry,
                       str(value.get("canonical_solution", "")))
    if {"text", "code", "test_list"} <= value.keys():
        tests = value["test_list"]
        if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
            raise TaskError(f"{where}: MBPP 'test_list' must be a non-empty list of strings")
        prompt = f'"""\n{value["text"]}\n{tests[0]}\n"""\n'
        setup = str(value.get("test_setup_code") or "")
        return Problem(task, str(value.get("task_id", index)), prompt, setup + "\n" + "\n".join(tests),
                       None, str(value["code"]))
    raise TaskError(f"{where}: a record needs 'task_id', 'prompt' and 'tests' (or MBPP's 'text', 'code' and "
                    f"'test_list'); it has {sorted(value)}")


def load_jsonl(path: str | pathlib.Path, task: str) -> list[Problem]:
    """The problems of a local jsonl suite (see the module docstring).

    Args:
      path: the file.
      task: the task name the problems carry (`jsonl:PATH`).

    Raises:
      TaskError: the file is missing, empty, or a line is not a record (the message names the line).
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"task {task}: no such file {path}; give jsonl:PATH of a local .jsonl file")
    problems, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
            problem = _record(value, where, task, len(problems))
            if problem.task_id in seen:
                raise TaskError(f"{where}: task_id {problem.task_id!r} appears twice; give each record its own id")
            seen.add(problem.task_id)
            problems.append(problem)
    if not problems:
        raise TaskError(f"task {task}: {path} holds no record")
    return problems
