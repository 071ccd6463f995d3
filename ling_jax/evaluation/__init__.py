"""Code benchmarks by execution: HumanEval and its fill-in-the-middle variants, local jsonl suites, pass@k.

`python -m ling_jax.evaluation` is the command line (see `ling_jax/evaluation/__main__.py` and
docs/evaluation.md); `code_scores` is the function a training loop calls at its eval steps;
`ling_jax.evaluation.lm_eval_model` makes the models an lm-eval harness model (`ling_jax`).
"""

from ling_jax.evaluation.pass_at_k import mean_pass_at_k, pass_at_k
from ling_jax.evaluation.runner import EvalSettings, code_scores, evaluate, write_results
from ling_jax.evaluation.sandbox import ExecResult, FailureKind, Limits, run_program, run_programs
from ling_jax.evaluation.tasks import load_tasks

__all__ = ["EvalSettings", "ExecResult", "FailureKind", "Limits", "code_scores", "evaluate", "load_tasks",
           "mean_pass_at_k", "pass_at_k", "run_program", "run_programs", "write_results"]
