"""Where a jitted step's device time goes, by part of the model, from a `jax.profiler` trace.

`breakdown(compiled_hlo_text, trace_dir)` maps every op event of the trace to
the `op_name` metadata of its HLO instruction (the JAX source path: module
names, `jvp` / `transpose` for the backward pass) and sums the durations by
`CATEGORIES` (first match wins), with layout copies (XLA `copy*`,
`transpose*`, `wrapped_broadcast*` thunks) counted apart. Events of the
runtime itself (thunk executors, loops, host functions) are left out, so the
shares are of op time, not of wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re

# (category, substrings of the op_name), first match wins.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vocab projection and loss", ("lm_head", "log_softmax", "logsumexp", "take_along_axis", "/embed/")),
    ("attention", ("/attention/",)),
    ("norms", ("norm",)),
    ("shared experts", ("shared_experts",)),
    ("routed experts (grouped matmuls)", ("moe_layers/mlp/while", "grouped_matmul")),
    ("router, permute / unpermute, combine", ("moe_layers/mlp",)),
    ("dense-first MLP", ("dense_layers/mlp",)),
)
# Named by no model module: the layer scans' slices of stacked weights and stacking of their gradients,
# broadcasts, residual adds, the optimizer's elementwise update.
OTHER = "other (layer-scan slices and gradient stacking, broadcasts, residual adds, optimizer update)"
_RUNTIME = ("ThunkExecutor", "$", "SlinkyThreadPool", "while", "Pjit", "CommonPjRt", "MutexLock")
_COPY = ("copy", "transpose", "wrapped_copy", "wrapped_broadcast", "wrapped_transpose")


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its `op_name` metadata, from a compiled module's text."""
    return {m.group(1): m.group(2) for m in re.finditer(r'%([\w.\-]+) = [^\n]*?op_name="([^"]+)"', hlo_text)}


def category(op_name: str) -> str:
    """The `CATEGORIES` entry of an op, else `OTHER`."""
    return next((name for name, keys in CATEGORIES if any(k in op_name for k in keys)), OTHER)


def breakdown(hlo_text: str, trace_dir: str) -> list[tuple[str, float, float]]:
    """`(category, share of op time, of which layout copies)` for the trace in `trace_dir`, largest first."""
    names = op_names(hlo_text)
    files = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(sorted(files)[-1]) as f:
        events = json.load(f)["traceEvents"]
    total, copies = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e["name"].startswith(_RUNTIME):
            continue
        cat = category(names.get(e["name"], ""))
        total[cat] += e["dur"]
        if e["name"].startswith(_COPY):
            copies[cat] += e["dur"]
    whole = sum(total.values()) or 1.0
    return [(cat, t / whole, copies[cat] / whole) for cat, t in total.most_common()]


def print_breakdown(rows: list[tuple[str, float, float]]) -> None:
    """The breakdown as a Markdown table."""
    print("| part of the step | share of op time | of which layout copies |")
    print("| --- | --- | --- |")
    for cat, share, copy in rows:
        print(f"| {cat} | {share:.1%} | {copy:.1%} |")
