"""Evaluation throughput: sandboxed programs executed per second against workers, and generation tokens/s.

    python benchmarks/bench_eval.py [--programs 164] [--workers 1,2] [--limit 8] [--max-new-tokens 64]

Execution: the canonical solutions of the first `--programs` HumanEval problems (all pass), each
in its own sandboxed subprocess, for each worker count. Generation: the bench model of
`configs/bench_cpu.py` (random weights; it never emits EOS, so every row decodes all its tokens)
with a SentencePiece tokenizer trained here, greedy, batch 8, on `--limit` problems of `humaneval`
and of `humaneval_infill_single`; timed twice, the first pass including the compiles.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ling_jax  # noqa: E402
from ling_jax.data.fim import LING_FIM_TOKENS  # noqa: E402
from ling_jax.evaluation.generation import Sampling, generate_samples  # noqa: E402
from ling_jax.evaluation.humaneval import humaneval  # noqa: E402
from ling_jax.evaluation.prompts import PromptBuilder  # noqa: E402
from ling_jax.evaluation.sandbox import run_programs  # noqa: E402
from ling_jax.evaluation.tasks import load_tasks  # noqa: E402
from train import model_from_config  # noqa: E402


def bench_execution(count: int, workers: list[int]) -> None:
    problems = humaneval()[:count]
    programs = [p.program(p.reference) for p in problems]
    for w in workers:
        start = time.perf_counter()
        results = run_programs(programs, workers=w)
        seconds = time.perf_counter() - start
        print(f"execute  workers={w}: {len(programs) / seconds:6.1f} programs/s "
              f"({sum(r.passed for r in results)}/{len(programs)} passed, {seconds:.1f} s)")


def bench_generation(limit: int, max_new_tokens: int) -> None:
    spec = importlib.util.spec_from_file_location("bench_cpu", os.path.join(ROOT, "configs", "bench_cpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = model_from_config(module.get_config())
    params = ling_jax.init_params(model, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = ling_jax.train_sentencepiece([p.prompt + p.reference for p in humaneval()],
                                                 os.path.join(tmp, "tok.model"), 1024,
                                                 user_defined_symbols=list(LING_FIM_TOKENS))
        builder = PromptBuilder(tokenizer)
        for task, problems in load_tasks("humaneval,humaneval_infill_single", limit).items():
            for label in ("first (compiles)", "second"):
                _, stats = generate_samples(model, params, builder, problems, Sampling(), batch_size=8,
                                            max_new_tokens=max_new_tokens)
                print(f"generate {task:24s} {label:16s}: {stats.tokens_per_second:8.1f} tokens/s "
                      f"({stats.new_tokens} tokens, {stats.seconds:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=164, help="HumanEval canonical solutions to execute")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--limit", type=int, default=8, help="problems per task for the generation timing")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    bench_execution(args.programs, [int(w) for w in args.workers.split(",")])
    bench_generation(args.limit, args.max_new_tokens)


if __name__ == "__main__":
    main()
