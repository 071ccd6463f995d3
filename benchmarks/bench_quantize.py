"""int8 weights on the trained demo model: weight memory, held-out loss and greedy agreement against float, in one run.

    python benchmarks/bench_quantize.py [--workdir /tmp/bench_demo/after] [--group-sizes 0 128] [--new-tokens 48]

The model is the demo as the README trains it (`configs/demo.py`). A workdir
that holds no checkpoint is trained first with the README's command
(`python train.py --config configs/demo.py --workdir ...`, about six minutes on
2 cores); `benchmarks/bench_demo.py` leaves one in `/tmp/bench_demo/after`.

For float32 and for each int8 scheme (`--group-sizes`: 0 is one scale per
output channel, N one per N input rows) the same checkpoint is loaded with
`ling_jax.from_pretrained(workdir, quantize=...)` and scored on the demo's
held-out stdlib files exactly as `bench_demo.py` scores recipes (bits per
byte, no FIM). Weight memory is measured from the arrays
(`ling_jax.model.quantization.weight_bytes`, int8 values plus their float32
scales) against the same parameters in bfloat16. Greedy agreement is the
fraction of the float model's greedy tokens (the demo's sample prompts,
`--new-tokens` each, one left-padded batch) that the int8 model reproduces
before its first different token.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import ling_jax  # noqa: E402
from benchmarks.bench_demo import bits_per_byte, held_out_documents  # noqa: E402
from configs import demo  # noqa: E402
from ling_jax.data.tokenizer import load_tokenizer  # noqa: E402
from ling_jax.inference.decoding import left_pad  # noqa: E402
from ling_jax.model.quantization import weight_bytes  # noqa: E402


def ensure_trained(workdir: str) -> None:
    """Trains the demo into `workdir` with the README's command unless a checkpoint is there."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    cmd = [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", workdir]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def greedy(model, params, ids: np.ndarray, mask: np.ndarray, new: int) -> np.ndarray:
    """The new greedy tokens [B, new] (no early stop)."""
    out = ling_jax.generate(model, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=new,
                            eos_token_id=-1)
    return np.asarray(out)[:, ids.shape[1]:]


def agreement(reference: np.ndarray, got: np.ndarray) -> float:
    """Fraction of `reference`'s tokens that `got` matches before each row's first difference."""
    same = np.cumprod(reference == got, axis=1)
    return float(same.sum() / reference.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_demo/after", help="the demo's workdir (trained if empty)")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[0, 128],
                        help="int8 schemes: 0 = per output channel, N = per N input rows")
    parser.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per sample prompt")
    args = parser.parse_args()
    ensure_trained(args.workdir)
    cfg = demo.get_config()
    documents = held_out_documents()
    tokenizer = load_tokenizer(args.workdir)
    ids, mask = left_pad([tokenizer.encode(p) for p in cfg.sample_prompts], tokenizer.pad_id or 0)

    model, params = ling_jax.from_pretrained(args.workdir)
    float_bytes = weight_bytes(params)  # float32
    float_bpb, tokens = bits_per_byte(model, params, tokenizer, cfg, documents)
    float_tokens = greedy(model, params, ids, mask, args.new_tokens)
    del params
    print(f"{args.workdir}: {len(documents)} held-out files, {tokens:,} tokens scored; "
          f"{len(cfg.sample_prompts)} prompts x {args.new_tokens} greedy tokens")
    print("| weights | weight bytes | / bfloat16 | held-out bits/byte | change vs float32 | greedy agreement |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| float32 | {float_bytes:,} | 2.00 | {float_bpb:.4f} | | 1.000 |")
    for group in args.group_sizes:
        qmodel, qparams = ling_jax.from_pretrained(args.workdir, quantize="int8", quantize_group_size=group or None)
        bpb, _ = bits_per_byte(qmodel, qparams, tokenizer, cfg, documents)
        same = agreement(float_tokens, greedy(qmodel, qparams, ids, mask, args.new_tokens))
        name = "int8, per channel" if not group else f"int8, per {group} rows"
        ratio = weight_bytes(qparams) / (float_bytes / 2)  # against the same parameters in bfloat16
        print(f"| {name} | {weight_bytes(qparams):,} | {ratio:.2f} | {bpb:.4f} | {bpb - float_bpb:+.4f} "
              f"({bpb / float_bpb - 1:+.2%}) | {same:.3f} |", flush=True)

if __name__ == "__main__":
    main()
