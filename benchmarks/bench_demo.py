"""The quick-start demo before and after tuning: wall time, held-out bits per byte and the completions, in one run.

    python benchmarks/bench_demo.py [--recipes before after] [--workdir /tmp/bench_demo]

Each recipe is `configs/demo.py` (`after`, the demo as the README runs it) or
`configs/demo.py:before` (the recipe the demo had before it was tuned), run as
the README runs it (`python train.py --config ... --workdir ...`), back to
back, in fresh workdirs. The wall time is the whole command: the tokenizer
trained on the fly, compiles, training, evaluations, checkpoints, the samples.

Both finished models are then scored on the same text: every held-out stdlib
file of the demo's split (`data.eval_fraction` picks files by index, so both
recipes hold out the same files), without fill-in-the-middle, each file
tokenized by its run's tokenizer with the EOS training appends, cut into rows of
the run's `seq_len` (each row one segment, as training packs them). Bits per
byte = summed cross-entropy / ln 2 / UTF-8 bytes of the files: it compares
recipes with different tokenizers. The table prints the ratio after / before;
the samples are the completions each run printed at its end.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ling_jax  # noqa: E402
from configs import demo  # noqa: E402
from ling_jax.config import IGNORE_INDEX  # noqa: E402
from ling_jax.data.pipeline import document_indices  # noqa: E402
from ling_jax.data.sources import make_source  # noqa: E402
from ling_jax.data.tokenizer import load_tokenizer  # noqa: E402
from ling_jax.train.step import eval_step  # noqa: E402

RECIPES = {"before": "configs/demo.py:before", "after": "configs/demo.py"}
SAMPLE_HEADER = "--- sample from the trained model ---"


def train(recipe: str, workdir: str) -> tuple[float, str]:
    """Runs the demo command of `recipe` in a fresh `workdir`: (wall seconds, the samples it printed)."""
    shutil.rmtree(workdir, ignore_errors=True)
    cmd = [sys.executable, "train.py", "--config", RECIPES[recipe], "--workdir", workdir]
    print("$", " ".join(cmd), flush=True)
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    out = done.stdout
    start = out.find(SAMPLE_HEADER)
    end = out.find("--- the run is a model", start)
    sample = out[start + len(SAMPLE_HEADER):end if end > 0 else None].strip("\n") if start >= 0 else "(no sample)"
    return seconds, sample


def held_out_rows(text_ids: list[list[int]], seq_len: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Batches of one-segment rows covering every document's tokens; each token but a row's first is a target."""
    rows = []
    for ids in text_ids:
        for lo in range(0, max(len(ids) - 1, 1), seq_len):
            rows.append(ids[lo:lo + seq_len + 1])  # seq_len inputs and their next tokens
    batches = []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b:b + batch_size]
        inputs = np.zeros((batch_size, seq_len), np.int32)
        targets = np.full((batch_size, seq_len), IGNORE_INDEX, np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)
        for i, row in enumerate(chunk):
            n = len(row) - 1
            inputs[i, :n], targets[i, :n], segments[i, :n] = row[:-1], row[1:], 1
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()
        batches.append({"inputs": inputs, "targets": targets, "segment_ids": segments, "positions": positions})
    return batches


def bits_per_byte(model, params, tokenizer, cfg, documents: list[str]) -> tuple[float, int]:
    """Held-out bits per byte of a model trained with run config `cfg` on `documents`, and the number of tokens
    scored."""
    ids = [tokenizer.encode(d, add_bos=bool(cfg.data.add_bos), add_eos=bool(cfg.data.add_eos)) for d in documents]
    step = jax.jit(functools.partial(eval_step, model=model))
    nll, tokens = 0.0, 0
    for batch in held_out_rows(ids, cfg.seq_len, cfg.batch_size):
        sums = jax.device_get(step(params, batch))
        nll, tokens = nll + float(sums["nll_sum"]), tokens + int(sums["tokens"])
    return nll / math.log(2) / sum(len(d.encode("utf-8")) for d in documents), tokens


def held_out_documents() -> list[str]:
    """The demo's held-out stdlib files (the same for both recipes: the split is by file index)."""
    cfg = demo.get_config()
    assert cfg.data.eval_fraction == demo.get_config("before").data.eval_fraction
    source = make_source(cfg.data, cfg.seq_len)
    docs = [source.document(int(i)) for i in document_indices(len(source), cfg.data.eval_fraction, train=False)]
    return [d for d in docs if isinstance(d, str) and d]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--workdir", default="/tmp/bench_demo", help="one fresh subdirectory per recipe")
    args = parser.parse_args()
    documents = held_out_documents()
    size = sum(len(d.encode("utf-8")) for d in documents)
    results = {}
    for recipe in args.recipes:
        workdir = os.path.join(args.workdir, recipe)
        seconds, sample = train(recipe, workdir)
        model, params = ling_jax.from_pretrained(workdir)
        bpb, tokens = bits_per_byte(model, params, load_tokenizer(workdir),
                                    demo.get_config("before" if recipe == "before" else None), documents)
        results[recipe] = (seconds, bpb, tokens, sample)
        print(f"{recipe}: {seconds:.0f} s, {bpb:.3f} bits/byte", flush=True)
    print(f"\nheld-out: {len(documents)} stdlib files, {size:,} bytes, no FIM; load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print("| recipe | wall time | held-out bits/byte | tokens scored |")
    print("| --- | --- | --- | --- |")
    for recipe, (seconds, bpb, tokens, _) in results.items():
        print(f"| {RECIPES[recipe]} | {seconds / 60:.1f} min | {bpb:.3f} | {tokens:,} |")
    if {"before", "after"} <= set(results):
        (t0, b0, *_), (t1, b1, *_) = results["before"], results["after"]
        print(f"| after / before | {t1 / t0:.2f}x | {b1 / b0:.2f}x ({1 - b1 / b0:.1%} lower) | |")
    for recipe, (*_, sample) in results.items():
        sample = re.sub(r"\n{3,}", "\n\n", sample)
        print(f"\n--- {recipe}: samples ---\n{sample}")


if __name__ == "__main__":
    main()
