"""Grouped-matmul speed on the running backend, one table, every number from the same run.

    python benchmarks/bench_gmm.py                      # Ling-lite expert shapes (minutes on 2 cores)
    python benchmarks/bench_gmm.py --tokens 128 --hidden 512 --ffn 384 --experts 16   # quick look

Shapes default to a Ling-lite expert projection: k = hidden 2048, n = expert
ffn 1408, 64 experts, 1024 tokens x top-6 = 6144 rows. Routing is either
*balanced* (each token picks top-k distinct experts uniformly) or *skewed*
(distinct experts drawn with probability ~ 1 / rank: the top expert gets
most tokens, the median expert about half the balanced share). For float32 and bfloat16, forward and
forward+backward (gradients w.r.t. lhs and rhs), the table gives milliseconds,
useful GFLOP/s (2*M*K*N forward, 6*M*K*N forward+backward), percent of a dense
matmul of the same FLOPs and dtype ([M, K] @ [K, N]), and the speed-up over
`jax.lax.ragged_dot`.

Implementations: `xla` (`GmmImpl.XLA`), `ragged_dot`, `loop` (a naive Python
loop over experts with concrete group sizes, one jitted dot per expert; its
backward is the same loop over the three per-expert products), `reference`
(`GmmImpl.REFERENCE`, gathers an [M, K, N] weight: only run when that fits in
`--reference-gib`), `pallas` (only on TPU/GPU: on CPU Pallas runs only in the
interpreter, which says nothing about speed) and `dense`.

Timing: every implementation is compiled ahead of time and (except
`ragged_dot`, which takes tens of seconds per call on CPU) run once to warm
up; then the implementations are timed in interleaved rounds and the best
round is kept (the machine is shared). `ragged_dot` gets `--ragged-repeats`
rounds (default 1). Gradients of [E, K, N] weights are fresh buffers of
hundreds of MB: on Linux without transparent huge pages their page faults
are a visible part of the backward time of every grouped implementation
(the dense baseline's weight gradient is 64x smaller): writing a fresh 738 MB
float32 buffer takes about 210 ms with 4 KiB pages and 65 ms with huge pages.
So on Linux the benchmark re-runs itself with glibc's malloc on transparent
huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, the setting we
recommend for CPU training, see the README) and says so in its header;
``--no-hugepages`` measures with the environment as it is.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ling_jax.model.grouped_matmul import GmmImpl, grouped_matmul

Fn = Callable[[], object]


def routing(kind: str, tokens: int, topk: int, experts: int, rng: np.random.Generator) -> np.ndarray:
    """Rows per expert for `tokens` tokens choosing `topk` distinct experts each."""
    if kind == "balanced":
        p = np.full(experts, 1.0 / experts)
    elif kind == "skewed":
        p = 1.0 / np.arange(1, experts + 1)
        p /= p.sum()
    else:
        raise ValueError(f"unknown routing {kind!r}")
    choice = np.stack([rng.choice(experts, topk, replace=False, p=p) for _ in range(tokens)])
    return np.bincount(choice.ravel(), minlength=experts).astype(np.int32)


def _block(x: object) -> None:
    jax.block_until_ready(x)


def loop_fns(x: jax.Array, w: jax.Array, dy: jax.Array, sizes: np.ndarray) -> tuple[Fn, Fn]:
    """The naive per-expert Python loop, forward and forward+backward."""
    ends = np.cumsum(sizes)
    spans = [(int(e - s), int(e)) for s, e in zip(sizes, ends, strict=True) if s]
    groups = [g for g, s in enumerate(sizes) if s]
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    mm_t = jax.jit(lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(a.dtype))
    tn = jax.jit(lambda a, b: jnp.dot(a.T, b, preferred_element_type=jnp.float32).astype(a.dtype))

    def fwd() -> object:
        return jnp.concatenate([mm(x[s:e], w[g]) for g, (s, e) in zip(groups, spans, strict=True)])

    def fwd_bwd() -> object:
        y = fwd()
        dx = jnp.concatenate([mm_t(dy[s:e], w[g]) for g, (s, e) in zip(groups, spans, strict=True)])
        per_group = dict(zip(groups, (tn(x[s:e], dy[s:e]) for s, e in spans), strict=True))
        zero = jnp.zeros(w.shape[1:], w.dtype)
        dw = jnp.stack([per_group.get(g, zero) for g in range(w.shape[0])])
        return y, dx, dw

    return fwd, fwd_bwd


def impl_fns(impl: GmmImpl, x: jax.Array, w: jax.Array, dy: jax.Array, sizes: jax.Array) -> tuple[Fn, Fn]:
    """Ahead-of-time compiled forward and forward+backward of one `GmmImpl`."""
    f = jax.jit(lambda a, b, s: grouped_matmul(a, b, s, impl=impl))
    g = jax.jit(jax.value_and_grad(
        lambda a, b, s, c: jnp.vdot(grouped_matmul(a, b, s, impl=impl).astype(jnp.float32), c),
        argnums=(0, 1)))
    c = dy.astype(jnp.float32)
    fc = f.lower(x, w, sizes).compile()
    gc = g.lower(x, w, sizes, c).compile()
    return (lambda: fc(x, w, sizes)), (lambda: gc(x, w, sizes, c))


def dense_fns(x: jax.Array, w0: jax.Array, dy: jax.Array) -> tuple[Fn, Fn]:
    """A dense [M, K] @ [K, N] matmul: the same FLOPs as the grouped one."""
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
    g = jax.jit(jax.value_and_grad(
        lambda a, b, c: jnp.vdot(jnp.dot(a, b, preferred_element_type=jnp.float32), c), argnums=(0, 1)))
    c = dy.astype(jnp.float32)
    fc = f.lower(x, w0).compile()
    gc = g.lower(x, w0, c).compile()
    return (lambda: fc(x, w0)), (lambda: gc(x, w0, c))


def time_rounds(fns: dict[str, Fn], repeats: dict[str, int], warm: set[str]) -> dict[str, float]:
    """Best wall time per function over interleaved rounds (after one warm-up call for `warm`)."""
    for name in warm:
        _block(fns[name]())
    best = {name: float("inf") for name in fns}
    for r in range(max(repeats.values())):
        for name, fn in fns.items():
            if r < repeats[name]:
                t0 = time.perf_counter()
                _block(fn())
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


HUGEPAGES = "glibc.malloc.hugetlb=1"


def ensure_hugepages(enabled: bool) -> str:
    """Re-executes this script with glibc malloc on transparent huge pages (Linux) unless disabled.

    Returns the line that describes the allocator for the table's header.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if HUGEPAGES in tunables:
        return f"malloc: transparent huge pages (GLIBC_TUNABLES={tunables})"
    if enabled and sys.platform == "linux":
        env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGEPAGES) if t))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return "malloc: default 4 KiB pages (--no-hugepages)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048, help="k")
    p.add_argument("--ffn", type=int, default=1408, help="n")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--routings", default="balanced,skewed")
    p.add_argument("--impls", default="xla,ragged_dot,loop,reference,pallas,dense")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ragged-repeats", type=int, default=1)
    p.add_argument("--reference-gib", type=float, default=2.0,
                   help="run `reference` only if its gathered [M, K, N] weight is below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hugepages", action=argparse.BooleanOptionalAction, default=True,
                   help="run with glibc malloc on transparent huge pages (re-executes the script)")
    a = p.parse_args()
    malloc = ensure_hugepages(a.hugepages)

    m, k, n, e = a.tokens * a.topk, a.hidden, a.ffn, a.experts
    impls = a.impls.split(",")
    backend = jax.default_backend()
    print(f"backend {backend}, {jax.device_count()} device(s), jax {jax.__version__}; "
          f"M={m} ({a.tokens} tokens x top-{a.topk}), K={k}, N={n}, {e} experts; {malloc}")
    notes = []
    if "pallas" in impls and backend == "cpu":
        impls.remove("pallas")
        notes.append("pallas: skipped on CPU (interpreter only; correctness is in the tests)")
    ref_gib = m * k * n * 4 / 2**30
    if "reference" in impls and ref_gib > a.reference_gib:
        impls.remove("reference")
        notes.append(f"reference: skipped, its gathered weight would take {ref_gib:.0f} GiB")

    rng = np.random.default_rng(a.seed)
    rows = []
    for kind in a.routings.split(","):
        sizes = routing(kind, a.tokens, a.topk, e, rng)
        print(f"{kind:8s} rows per expert: min {sizes.min()}, median {int(np.median(sizes))}, "
              f"max {sizes.max()}, empty {int((sizes == 0).sum())}")
        for dt_name in a.dtypes.split(","):
            dt = jnp.dtype(dt_name)
            x = jnp.asarray(rng.standard_normal((m, k), np.float32), dt)
            w = jnp.asarray(rng.standard_normal((e, k, n), np.float32) * k**-0.5, dt)
            dy = jnp.asarray(rng.standard_normal((m, n), np.float32), dt)
            s = jnp.asarray(sizes)
            fwd, fwd_bwd = {}, {}
            for name in impls:
                if name == "dense":
                    fwd[name], fwd_bwd[name] = dense_fns(x, w[0], dy)
                elif name == "loop":
                    fwd[name], fwd_bwd[name] = loop_fns(x, w, dy, sizes)
                else:
                    fwd[name], fwd_bwd[name] = impl_fns(GmmImpl(name), x, w, dy, s)
            reps = {name: a.ragged_repeats if name == "ragged_dot" else a.repeats for name in impls}
            warm = {name for name in impls if name != "ragged_dot"}
            for label, fns, flops in (("fwd", fwd, 2 * m * k * n), ("fwd+bwd", fwd_bwd, 6 * m * k * n)):
                best = time_rounds(fns, reps, warm)
                for name in impls:
                    rows.append((kind, dt_name, label, name, best[name], flops,
                                 best.get("dense"), best.get("ragged_dot")))
            del x, w, dy

    head = f"| {'routing':8s} | {'dtype':8s} | {'pass':7s} | {'impl':10s} | {'ms':>9s} | " \
           f"{'GFLOP/s':>8s} | {'% dense':>7s} | {'x ragged_dot':>12s} |"
    print()
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for kind, dt_name, label, name, t, flops, t_dense, t_ragged in rows:
        pct = f"{100 * t_dense / t:.0f}%" if t_dense else "-"
        speed = f"{t_ragged / t:.1f}x" if t_ragged else "-"
        print(f"| {kind:8s} | {dt_name:8s} | {label:7s} | {name:10s} | {1e3 * t:9.1f} | "
              f"{flops / t / 1e9:8.1f} | {pct:>7s} | {speed:>12s} |")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
