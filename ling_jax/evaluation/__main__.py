"""Command line: code benchmarks by execution (HumanEval, its FIM infilling variants, local jsonl suites).

    python -m ling_jax.evaluation --model PATH --tasks humaneval,humaneval_infill_single,humaneval_infill_multi \\
        --out DIR [--chat] [--n 1 --temperature 0] [--k 1] [--limit N] [--workers W]

`--model` is anything `ling_jax.from_pretrained` loads (a Hugging Face directory, a
`convert_weights.py` output, a `train.py` workdir or checkpoint step); the tokenizer is read from
`--tokenizer` and defaults to the model directory (for a `train.py` step, its workdir's
`tokenizer.model`). `--tasks` takes `humaneval`,
`humaneval_infill_single`, `humaneval_infill_multi` and `jsonl:PATH` (records
`{task_id, prompt, tests[, entry_point]}` or MBPP's `{text, code, test_list}`). Greedy decoding is
the default, as in the paper; `--n 10 --temperature 0.8 --top-p 0.95 --k 1,10` samples for pass@k.
The checkpoint's `generation_config.json` sampling defaults are deliberately not applied (a benchmark
fixes its own decoding, so scores compare across checkpoints); its `eos_token_id` list is: a sample
ends at EOS (with `--chat`, the template's end of turn) or at any id listed there.
Every program runs in its own sandboxed subprocess (`ling_jax.evaluation.sandbox`). DIR receives
`samples.jsonl` and `summary.json` (it appears only when complete).

Bad input (an unknown task, a missing or malformed task file, --n below a k, a path that is not a
checkpoint, a tokenizer without the FIM sentinels the infilling tasks need) is reported in one line
and exits with status 2 before any weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import sys

from ling_jax.config import DType, UserError
from ling_jax.data.chat_template import chat_template_for
from ling_jax.data.fim import FimFormat
from ling_jax.data.tokenizer import load_tokenizer
from ling_jax.evaluation.generation import Sampling
from ling_jax.evaluation.prompts import PromptBuilder
from ling_jax.evaluation.runner import EvalSettings, evaluate, write_results
from ling_jax.evaluation.sandbox import Limits
from ling_jax.evaluation.tasks import load_tasks
from ling_jax.inference import decoding
from ling_jax.io.atomic import check_output_dir
from ling_jax.io.generation_config import GenerationDefaults
from ling_jax.io.hub import local_path
from ling_jax.io.loading import from_pretrained, resolve_checkpoint
from ling_jax.model.quantization import Quantization

PROG = "python -m ling_jax.evaluation"


def _ks(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k takes comma-separated integers, got {text!r}") from None


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint: Hugging Face, converted, train.py workdir or step")
    p.add_argument("--tasks", required=True, help="comma-separated: humaneval, humaneval_infill_single, "
                                                  "humaneval_infill_multi, jsonl:PATH")
    p.add_argument("--out", required=True, help="output directory (samples.jsonl, summary.json)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (default: --model)")
    p.add_argument("--chat", action="store_true",
                   help="prompt through the checkpoint's chat template (else Ling's; SFT / DPO models)")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--k", type=_ks, default=(1,), help="comma-separated k of pass@k (each <= --n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default, as in the paper)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="the first N problems of each task")
    p.add_argument("--workers", type=int, default=2, help="programs executed at once")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded at once")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per problem (default: the task's own)")
    p.add_argument("--fim-format", choices=[f.value for f in FimFormat], default=FimFormat.PSM.value,
                   help="infilling prompt layout, as in training")
    p.add_argument("--dtype", choices=[d.value for d in DType], default=DType.BFLOAT16.value)
    p.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    p.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per program")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's bos token")
    p.add_argument("--quantize", choices=[q.value for q in Quantization],
                   help="int8 weights (dequantized in the matmuls)")
    p.add_argument("--quantize-group-size", type=int, help="with --quantize: one scale per this many input rows")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    for name in ("n", "workers", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return args


def _prepare(args: argparse.Namespace):
    """Everything checked and loaded except the weights: (checkpoint, tasks, builder, settings)."""
    decoding.Sampling(args.temperature, None, args.top_p)  # refuses a bad temperature / top-p
    limits = Limits(timeout_s=args.timeout, cpu_seconds=max(1, int(args.timeout + 0.999)),
                    memory_bytes=args.memory_mb << 20)
    settings = EvalSettings(Sampling(args.n, args.temperature, args.top_p, args.seed), args.k, args.batch_size,
                            args.workers, args.max_new_tokens, limits, progress=True)
    tasks = load_tasks(args.tasks, args.limit)
    check_output_dir(args.out, args.overwrite)
    ckpt = resolve_checkpoint(args.model, "--model")
    config = ckpt.config()
    tokenizer = load_tokenizer(local_path(args.tokenizer, "--tokenizer", tokenizer_only=True) if args.tokenizer
                               else ckpt.tokenizer_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocab_size {config.vocab_size}: pass the model's own --tokenizer")
    chat = chat_template_for(tokenizer) if args.chat else None  # the checkpoint's own template, else Ling's
    stops = GenerationDefaults.from_dir(ckpt.path).eos_token_ids  # e.g. Ling 2.0's EOS and <|role_end|>
    builder = PromptBuilder(tokenizer, FimFormat(args.fim_format), chat, add_bos=not args.no_bos,
                            extra_stop_ids=stops)
    for problems in tasks.values():
        builder.check(problems)
    return ckpt, tasks, builder, settings


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = _parse(argv)
    try:
        ckpt, tasks, builder, settings = _prepare(args)
        model, params = from_pretrained(ckpt.path, dtype=DType(args.dtype).jnp, quantize=args.quantize,
                                        quantize_group_size=args.quantize_group_size)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records, summary = evaluate(model, params, builder, tasks, settings)
    summary["model"] = ckpt.path
    write_results(args.out, records, summary, overwrite=args.overwrite)
    for task, s in summary["tasks"].items():
        scores = ", ".join(f"pass@{k} {s[f'pass@{k}']:.4f}" for k in settings.ks)
        print(f"{task}: {scores} ({s['problems']} problems, {s['samples']} samples; failures "
              f"{json.dumps(s['failures'])})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
