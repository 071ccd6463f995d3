"""Evaluation of a model on code tasks: generate, execute in the sandbox, score pass@k; and the results files.

`evaluate` runs every task and returns the per-sample records and the summary; `write_results`
writes them as `samples.jsonl` (one record per sample: task, task_id, sample, completion, passed,
kind, message, prompt_tokens_dropped) and `summary.json` (per task: problems, samples, pass@k by
the unbiased estimator, failures by kind, truncated prompts, generation tokens/s, programs/s),
into an output directory that appears only when complete. `code_scores` is the same run reduced
to `{"<task>_pass@1": value}` (greedy) for training loops.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm import tqdm

from ling_jax.data.tokenizer import Tokenizer
from ling_jax.evaluation.generation import Generated, Sampling, generate_samples
from ling_jax.evaluation.pass_at_k import check_ks, mean_pass_at_k
from ling_jax.evaluation.problems import Problem
from ling_jax.evaluation.prompts import PromptBuilder
from ling_jax.evaluation.sandbox import ExecResult, Limits, run_programs
from ling_jax.evaluation.tasks import load_tasks
from ling_jax.io.atomic import atomic_output_dir

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a run generates and executes.

    Attributes:
      sampling: samples per problem and how they are drawn.
      ks: the k of pass@k (each at most `sampling.n`).
      batch_size: rows per decode batch.
      workers: programs executed at once.
      max_new_tokens: new tokens of every problem (None: each task's own).
      limits: the sandbox limits of each program.
      progress: show progress bars.
    """

    sampling: Sampling = dataclasses.field(default_factory=Sampling)
    ks: tuple[int, ...] = (1,)
    batch_size: int = 8
    workers: int = 2
    max_new_tokens: int | None = None
    limits: Limits = dataclasses.field(default_factory=Limits)
    progress: bool = False

    def __post_init__(self):
        check_ks(self.ks, self.sampling.n)


def execute(problems: Sequence[Problem], completions: Sequence[tuple[int, str, bool]], settings: EvalSettings,
            desc: str = "executing") -> tuple[list[ExecResult], float]:
    """Runs (problem index, completion, standalone) triples in the sandbox; results and seconds taken."""
    programs = [problems[i].program(text, standalone=alone) for i, text, alone in completions]
    start = time.monotonic()
    with tqdm(total=len(programs), desc=desc, unit="program", disable=not settings.progress) as bar:
        results = run_programs(programs, settings.limits, workers=settings.workers, progress=bar.update)
    return results, time.monotonic() - start


def _task_summary(problems: Sequence[Problem], samples: Sequence[Generated], results: Sequence[ExecResult],
                  settings: EvalSettings, gen_tokens_per_s: float, exec_seconds: float) -> dict[str, Any]:
    passed = collections.Counter(s.problem for s, r in zip(samples, results, strict=True) if r.passed)
    scores = mean_pass_at_k(((settings.sampling.n, passed[i]) for i in range(len(problems))), settings.ks)
    failures = collections.Counter(r.kind.value for r in results if r.kind is not None)
    return {"problems": len(problems), "samples": len(samples), **{f"pass@{k}": v for k, v in scores.items()},
            "failures": dict(sorted(failures.items())),
            "truncated_prompts": sum(s.dropped_prompt_tokens > 0 for s in samples),
            "dropped_prompt_tokens": sum(s.dropped_prompt_tokens for s in samples),
            "max_new_tokens": sorted({s.max_new_tokens for s in samples}),
            "generation_tokens_per_second": gen_tokens_per_s,
            "programs_per_second": len(results) / exec_seconds if exec_seconds > 0 else 0.0}


def evaluate_task(model: Any, params: Any, builder: PromptBuilder, task: str, problems: Sequence[Problem],
                  settings: EvalSettings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generates, executes and scores one task; (sample records, task summary)."""
    samples, stats = generate_samples(model, params, builder, problems, settings.sampling,
                                      batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                                      progress=settings.progress)
    completions = [(s.problem, *builder.completion(problems[s.problem], s.text)) for s in samples]
    results, seconds = execute(problems, completions, settings, desc=f"executing {task}")
    records = [{"task": task, "task_id": problems[s.problem].task_id, "sample": s.sample, "completion": c[1],
                "passed": r.passed, "kind": r.kind.value if r.kind else None, "message": r.message,
                "prompt_tokens_dropped": s.dropped_prompt_tokens, "new_tokens": s.new_tokens}
               for s, c, r in zip(samples, completions, results, strict=True)]
    return records, _task_summary(problems, samples, results, settings, stats.tokens_per_second, seconds)


def evaluate(model: Any, params: Any, builder: PromptBuilder, tasks: Mapping[str, Sequence[Problem]],
             settings: EvalSettings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every task of `tasks`; (all sample records, {"tasks": {task: summary}, "settings": ...})."""
    for problems in tasks.values():
        builder.check(list(problems))
    records, summaries = [], {}
    for task, problems in tasks.items():
        task_records, summaries[task] = evaluate_task(model, params, builder, task, problems, settings)
        records += task_records
    s = settings.sampling
    meta = {"n": s.n, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "ks": list(settings.ks),
            "fim_format": builder.fim_format.value, "chat": builder.chat is not None,
            "limits": dataclasses.asdict(settings.limits)}
    return records, {"tasks": summaries, "settings": meta}


def write_results(out: str | os.PathLike, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], *,
                  overwrite: bool = False) -> None:
    """Writes `samples.jsonl` and `summary.json` into `out`, which appears only when both are complete."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        with open(os.path.join(tmp, SAMPLES_FILE), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(os.path.join(tmp, SUMMARY_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
            f.write("\n")


def code_scores(model: Any, params: Any, tokenizer: Tokenizer, tasks: Sequence[str], limit: int | None, *,
                batch_size: int = 8, workers: int = 2, max_new_tokens: int | None = None) -> dict[str, float]:
    """Greedy pass@1 of code tasks, for a training loop's eval steps.

    Args:
      model: a `LingForCausalLM` (its `max_position_embeddings` bounds prompt + completion).
      params: its parameters.
      tokenizer: the tokenizer the model is trained with (FIM sentinels for the infilling tasks).
      tasks: task names (`humaneval`, `humaneval_infill_single`, `humaneval_infill_multi`, `jsonl:PATH`).
      limit: the first `limit` problems of each task (None: all).
      batch_size: rows per decode batch.
      workers: programs executed at once.
      max_new_tokens: new tokens of every problem (None: each task's own).

    Returns:
      `{"<task>_pass@1": value in [0, 1]}`, one entry per task, in the order given.

    Raises:
      TaskError: an unknown task or a bad jsonl file, or infilling with a tokenizer without FIM sentinels.
    """
    loaded = load_tasks(list(tasks), limit)
    settings = EvalSettings(batch_size=batch_size, workers=workers, max_new_tokens=max_new_tokens)
    _, summary = evaluate(model, params, PromptBuilder(tokenizer), loaded, settings)
    return {f"{task}_pass@1": s["pass@1"] for task, s in summary["tasks"].items()}
