"""`python -m ling_jax.cli.plan`: memory and communication plan of a training run, per device.

    python -m ling_jax.cli.plan --model ling_coder_lite --mesh data=4,fsdp=4,expert=8 \\
        --batch-tokens 4194304 --seq-len 4096 --accumulation-steps 4 --remat full

The cost model is `ling_jax.train.planner`; this module parses the command line (the mesh syntax, a
zoo preset or a config.json) and prints the plan, after a line of what it assumes (remat, dtypes, chip:
the defaults are train.py's, e.g. `--remat none`). Bad input exits 2 with one line naming the fix.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from jax.sharding import Mesh

from ling_jax.config import DType, LingConfig, Remat, UserError
from ling_jax.inference.aot import compile_decode_step
from ling_jax.model import sharding
from ling_jax.model.aot import CompiledProgram, hbm_bytes, tpu_topology
from ling_jax.train.aot import compile_train_step
from ling_jax.train.planner import GIB, Chip, Plan, PlanError, mesh_str, plan, training_setup
from ling_jax.train.step import LossConfig
from ling_jax.zoo import get_config, list_models

TRAIN_DEFAULT_REMAT = "none"  # configs/default.py's config.remat: what a run does unless told otherwise


def parse_mesh(text: str, devices: int | None = None) -> dict[str, int]:
    """`"data=4,fsdp=4,expert=8"` -> sizes of all of `sharding.MESH_AXES` (missing axes are 1).

    One size may be -1 (the rest of `devices`).

    Raises:
      PlanError: bad syntax, an unknown or repeated axis, a size < 1, or a product other than `devices`.
    """
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise PlanError(f"mesh entry {part!r} is not AXIS=SIZE (e.g. --mesh data=4,fsdp=4,expert=8)")
        if name not in sharding.MESH_AXES:
            raise PlanError(f"unknown mesh axis {name!r}; the axes are {', '.join(sharding.MESH_AXES)}")
        if name in sizes:
            raise PlanError(f"mesh axis {name!r} is given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise PlanError(f"mesh size of {name!r} must be an integer, got {value.strip()!r}") from None
        if sizes[name] < 1 and sizes[name] != -1:
            raise PlanError(f"mesh size of {name!r} must be >= 1 (or -1 for the rest), got {sizes[name]}")
    if not sizes:
        raise PlanError("empty mesh; give e.g. --mesh data=4,fsdp=4,expert=8")
    rest = [a for a, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise PlanError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if devices is None or devices % known:
            raise PlanError(f"mesh axis {rest[0]}=-1 needs --devices divisible by {known}")
        sizes[rest[0]] = devices // known
    full = {a: sizes.get(a, 1) for a in sharding.MESH_AXES}
    if devices is not None and math.prod(full.values()) != devices:
        raise PlanError(f"mesh {mesh_str(full)} has {math.prod(full.values())} devices, but --devices is "
                        f"{devices}; make the product of the axis sizes match")
    return full


def load_config(model: str) -> LingConfig:
    """A zoo preset by name, or a `config.json` (file or directory holding one)."""
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if os.path.isfile(path):
        return LingConfig.from_json_file(path)
    if model not in list_models():
        raise PlanError(f"--model {model!r} is neither a zoo preset ({', '.join(list_models())}) "
                        "nor a config.json path")
    return get_config(model)


def format_plan(p: Plan, chip: Chip) -> str:
    """The plan as a readable text table."""
    g = lambda n: f"{n / GIB:9.2f} GiB"  # noqa: E731
    lines = [f"model {p.model}   mesh {mesh_str(p.mesh)} ({p.devices} devices)   "
             f"{p.tokens_per_device} tokens per device per microbatch",
             "", "memory per device"]
    for name, value in (("params", p.params), ("gradients", p.grads), ("optimizer state", p.opt_state)):
        lines.append(f"  {name:<34}{g(value)}")
    lines.append(f"  {'activations (estimate)':<34}{g(p.activations)}")
    lines += [f"    {k:<32}{g(v)}" for k, v in p.activation_parts.items()]
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines += [f"  {'total':<34}{g(p.total)}   of {p.hbm / GIB:.1f} GiB HBM: {verdict} "
              f"({100 * p.total / p.hbm:.0f}%)", "",
              "expert all-to-all per MoE layer per step, per device (dispatch + combine, fwd + bwd)",
              f"  {'ragged, balanced routing':<34}{g(p.a2a_per_layer['expected'])}",
              f"  {'padded worst case (XLA:CPU path)':<34}{g(p.a2a_per_layer['padded'])}",
              "", "communication per step, per device"]
    lines += [f"  {k:<34}{g(v)}" for k, v in p.comm.items()]
    lines += ["", f"time per step on {chip.value} (compute at peak, each collective at its bandwidth)"]
    lines += [f"  {k:<34}{v:9.3f} s" for k, v in p.seconds.items()]
    lines += [f"  MFU bound, no overlap / full overlap   {100 * p.mfu_bounds['no_overlap']:.1f}% / "
              f"{100 * p.mfu_bounds['full_overlap']:.1f}%"]
    return "\n".join(lines)


def format_assumptions(args: argparse.Namespace, p: Plan) -> str:
    """The line that says what the plan assumes and the flags that change it."""
    mu = args.mu_dtype.value if args.mu_dtype else args.param_dtype.value
    return (f"assumes: remat {args.remat.value} (--remat), params {args.param_dtype.value} / compute "
            f"{args.compute_dtype.value} / Adam mu {mu} (--param-dtype, --compute-dtype, --mu-dtype), chip "
            f"{args.chip.value} with {p.hbm / GIB:.1f} GiB HBM (--chip, --hbm-gib), {args.accumulation_steps} "
            "accumulation step(s) (--accumulation-steps)")


def compile_programs(cfg: LingConfig, args: argparse.Namespace, mesh: Mesh) -> list[CompiledProgram]:
    """The train step of the planned run and a decode step, compiled for `mesh` (TPU topology devices)."""
    model, optimizer = training_setup(cfg.replace(remat=args.remat), args.param_dtype, args.compute_dtype,
                                      args.mu_dtype)
    loss_cfg = LossConfig(accumulation_steps=args.accumulation_steps)
    train = compile_train_step(model, optimizer, loss_cfg, mesh, batch_size=args.batch_tokens // args.seq_len,
                               seq_len=args.seq_len)
    decode = compile_decode_step(model, mesh, batch_size=args.decode_batch, max_len=args.decode_len)
    return [train, decode]


def format_compiled(programs: list[CompiledProgram], p: Plan, device: Any, topology: str) -> str:
    """The compiler's memory per device beside the plan's estimate, and the fit against the chip's HBM."""
    g = lambda n: f"{n / GIB:9.2f} GiB"  # noqa: E731
    hbm = hbm_bytes(device) or p.hbm
    lines = [f"compiled by XLA:TPU for {topology} ({p.devices} x {device.device_kind}), memory per device"]
    for prog in programs:
        lines.append(f"  {prog.name} ({prog.seconds:.0f} s to compile)")
        lines += [f"    {name:<32}{g(value)}" for name, value in prog.memory.rows()]
    train = programs[0].memory
    verdict = "fits" if train.peak <= hbm else "DOES NOT FIT"
    lines += [f"  train_step peak {train.peak / GIB:.2f} GiB of {hbm / GIB:.1f} GiB HBM: {verdict} "
              f"({100 * train.peak / hbm:.0f}%)",
              f"  planner estimate {p.total / GIB:.2f} GiB = {p.total / max(train.peak, 1):.2f} x the compiler's peak "
              f"(state {p.params + p.opt_state:,} vs arguments {train.arguments:,} bytes)"]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ling_jax.cli.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="zoo preset or config.json path")
    ap.add_argument("--mesh", required=True, help="e.g. data=4,fsdp=4,expert=8[,tensor=1]")
    ap.add_argument("--devices", type=int, help="device count the mesh must have (allows one -1 axis)")
    ap.add_argument("--batch-tokens", type=int, required=True, help="global tokens per optimizer step")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    ap.add_argument("--accumulation-steps", type=int, default=1, help="microbatches per step (default: 1)")
    for name, default, what in (("param", DType.FLOAT32, "parameters"), ("compute", DType.BFLOAT16, "compute"),
                                ("mu", None, "AdamW's first moment")):
        shown = default.value if default else "the parameter dtype"
        ap.add_argument(f"--{name}-dtype", type=DType, default=default, choices=list(DType),
                        help=f"dtype of the {what} (default: {shown})")
    ap.add_argument("--remat", type=Remat, default=Remat(TRAIN_DEFAULT_REMAT), choices=list(Remat),
                    metavar="{none,full,dots}",
                    help=f"remat per decoder layer (default: {TRAIN_DEFAULT_REMAT}, as train.py's config.remat)")
    ap.add_argument("--chip", type=Chip, default=Chip.V5P, choices=list(Chip),
                    help=f"the accelerator: peak FLOP/s, HBM, bandwidths (default: {Chip.V5P.value})")
    ap.add_argument("--hbm-gib", type=float, default=None, help="device memory (default: the chip's)")
    ap.add_argument("--compile", metavar="TOPOLOGY", default="",
                    help="also compile the real train and decode steps for this TPU topology (e.g. v5p:4x4x2; "
                         "needs the TPU compiler, pip install 'ling_jax[tpu]') and print the compiler's memory")
    ap.add_argument("--num-slices", type=int, default=1, help="with --compile: slices of that topology (default: 1)")
    ap.add_argument("--decode-batch", type=int, default=8, help="with --compile: rows of the decode step (default: 8)")
    ap.add_argument("--decode-len", type=int, default=4096,
                    help="with --compile: KV-cache slots of the decode step (default: 4096)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (2 for bad input)."""
    args = _parser().parse_args(argv)
    try:
        devices = tpu_topology(args.compile, args.num_slices) if args.compile else None
        mesh = parse_mesh(args.mesh, len(devices) if devices else args.devices)
        cfg = load_config(args.model)
        result = plan(cfg, mesh, name=args.model, batch_tokens=args.batch_tokens, seq_len=args.seq_len,
                      param_dtype=args.param_dtype, compute_dtype=args.compute_dtype, remat=args.remat,
                      accumulation_steps=args.accumulation_steps, mu_dtype=args.mu_dtype, chip=args.chip,
                      hbm_gib=args.hbm_gib)
        print(format_assumptions(args, result) + "\n\n" + format_plan(result, args.chip), flush=True)
        if devices:
            programs = compile_programs(cfg, args, sharding.make_mesh(mesh, devices=devices))
            print("\n" + format_compiled(programs, result, devices[0], args.compile))
    except UserError as e:  # PlanError, a ConfigError of a config.json, a TopologyError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
