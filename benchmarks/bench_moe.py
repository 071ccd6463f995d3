"""A full MoE layer of Ling-lite shape, forward + backward, against a dense matmul timed in the same run.

    python benchmarks/bench_moe.py [--tokens 2048] [--impl xla] [--repeats 3]

The layer is `ling_jax.model.moe.MoE` (router, permute, gate/up/down grouped matmuls,
SwiGLU, unpermute, combine, shared experts). Useful FLOPs count only what a
dropless MoE must do: the router, top-k experts per token and the shared
experts, forward and backward (3x the forward matmuls).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ling_jax
from ling_jax.model.moe import MoE


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--impl", default="xla", help="GmmImpl value: xla, ragged_dot, pallas, reference")
    parser.add_argument("--model", default="ling_lite", help="zoo preset giving the layer shape")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cfg = ling_jax.get_config(args.model, gmm_impl=args.impl)
    D, F, E, k, S = (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                     cfg.shared_intermediate_size)
    layer = MoE(cfg)
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, D), jnp.float32)
    params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x)["params"])

    def loss(p, x):
        return jnp.sum(layer.apply({"params": p}, x) ** 2)

    fwd = jax.jit(lambda p, x: layer.apply({"params": p}, x))
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t_fwd = _time(fwd, params, x, repeats=args.repeats)
    t_fwd_bwd = _time(fwd_bwd, params, x, repeats=args.repeats)

    # A dense matmul with the shape of the routed gate projection: [T * k, D] @ [D, F].
    a = jax.random.normal(jax.random.key(2), (args.tokens * k, D), jnp.float32)
    b = jax.random.normal(jax.random.key(3), (D, F), jnp.float32)
    t_dense = _time(jax.jit(jnp.dot), a, b, repeats=args.repeats)
    dense_rate = 2 * args.tokens * k * D * F / t_dense

    per_token = 2 * (3 * k * D * F + 3 * D * S + D * E)  # forward matmul FLOPs of one token
    useful_fwd = args.tokens * per_token
    print(f"MoE layer of {args.model}: D {D}, F {F}, {E} experts top-{k}, shared width {S}, "
          f"{args.tokens} tokens, gmm {args.impl}, {jax.default_backend()}")
    print("| pass | time (ms) | useful GFLOP/s | % of dense |")
    print("| --- | --- | --- | --- |")
    for name, t, flops in (("forward", t_fwd, useful_fwd), ("forward + backward", t_fwd_bwd, 3 * useful_fwd)):
        rate = flops / t
        print(f"| {name} | {t * 1e3:.0f} | {rate / 1e9:.1f} | {rate / dense_rate:.0%} |")
    print(f"| dense [T*k, D] @ [D, F] | {t_dense * 1e3:.0f} | {dense_rate / 1e9:.1f} | 100% |")


if __name__ == "__main__":
    main()
