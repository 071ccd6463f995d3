"""Convert Ling (BailingMoe) weights between Hugging Face safetensors and Orbax, streaming.

    python convert_weights.py hf-to-jax --hf-dir DIR --out DIR [--dtype bfloat16|float32] [--overwrite]
    python convert_weights.py jax-to-hf --ckpt DIR --out DIR [--max-shard-size 5GB] [--dtype ...]
        [--reference-dir DIR] [--config FILE] [--params-key KEY] [--overwrite]

(`convert_weights.py` at the repository root runs this module's `main`;
`python -m ling_jax.cli.convert` is the same command.) Both directions read and
write one tensor at a time (see `ling_jax.io.convert` for the on-disk layout
and the memory bound), write into `OUT.tmp-XXXX` and rename it to `OUT` only
when everything is written. A round trip is bit-exact. Errors in the input
(missing or corrupt files, tensors that do not match the config, an existing
output) are reported on stderr in one line per problem, without a traceback,
with the fix and exit status 1 (every offending tensor is listed); bad usage
exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import textwrap
from collections.abc import Sequence

from ling_jax.config import DType, UserError
from ling_jax.io.convert import convert_hf_to_orbax, convert_orbax_to_hf

PROG = "convert_weights.py"

HF_TO_JAX_EPILOG = """examples:
  # the published bf16 checkpoint, kept in bf16 (bit-exact)
  python convert_weights.py hf-to-jax --hf-dir ~/models/Ling-Coder-lite --out ~/ckpt/ling-coder-lite
  # stored in float32 (e.g. to fine-tune in float32), replacing an earlier conversion
  python convert_weights.py hf-to-jax --hf-dir ~/models/Ling-lite --out ~/ckpt/ling-lite-f32 \\
      --dtype float32 --overwrite

then, in Python:
  model, params = ling_jax.from_pretrained("~/ckpt/ling-coder-lite", dtype=jnp.bfloat16)
"""

JAX_TO_HF_EPILOG = """examples:
  # back to the Hugging Face layout, with the tokenizer and model code of the original
  python convert_weights.py jax-to-hf --ckpt ~/ckpt/ling-coder-lite --out ~/export/ling-coder-lite \\
      --reference-dir ~/models/Ling-Coder-lite
  # from a training checkpoint step (its state/ item, params key and model_config/ are found)
  python convert_weights.py jax-to-hf --ckpt ~/runs/sft/checkpoints/2000 --out ~/export/sft-2000 \\
      --dtype bfloat16
  # any Orbax PyTree checkpoint: say where the parameters are and which config they follow
  python convert_weights.py jax-to-hf --ckpt ~/other/ckpt/state --params-key train_state.params \\
      --config ~/ckpt/ling-coder-lite/config.json --out ~/export/other --max-shard-size 2GB
"""

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """`"5GB"` -> 5 * 10**9 (decimal units as transformers' `max_shard_size`, `GiB` binary), or plain bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser with its two subcommands."""
    dtypes = [d.value for d in DType]
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{hf-to-jax,jax-to-hf}")

    h2j = sub.add_parser(
        "hf-to-jax", help="Hugging Face safetensors directory -> Orbax checkpoint directory",
        description=textwrap.fill(
            "Convert a Hugging Face BailingMoe checkpoint (config.json plus single or sharded safetensors) into a "
            "ling_jax directory: an Orbax checkpoint of the parameter tree under OUT/params, plus config.json, "
            "generation_config.json, tokenizer files and *.py copied when present. Memory: about one tensor "
            "plus a 64 MiB write buffer (x3 while encoding)."),
        epilog=HF_TO_JAX_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    h2j.add_argument("--hf-dir", required=True, help="the Hugging Face checkpoint directory")
    h2j.add_argument("--out", required=True, help="the directory to create")
    h2j.add_argument("--dtype", choices=dtypes, default=None,
                     help="storage dtype (default: as in the checkpoint, bit-exact)")
    h2j.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    h2j.set_defaults(run=_hf_to_jax)

    j2h = sub.add_parser(
        "jax-to-hf", help="Orbax checkpoint (converted or training) -> Hugging Face safetensors directory",
        description=textwrap.fill(
            "Write a Hugging Face BailingMoe checkpoint (model-0000N-of-0000M.safetensors with the original "
            "tensor names and layouts, model.safetensors.index.json, config.json with every original key, "
            "generation_config.json) from a directory written by hf-to-jax or from any Orbax PyTree checkpoint "
            "holding the parameters. Memory: about one tensor."),
        epilog=JAX_TO_HF_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    j2h.add_argument("--ckpt", required=True,
                     help="a directory written by hf-to-jax, an Orbax PyTree checkpoint (the directory "
                          "holding _METADATA), or a CheckpointManager step directory with one such item")
    j2h.add_argument("--out", required=True, help="the directory to create")
    j2h.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                     help="largest shard, e.g. 5GB (default), 500MB, 2GiB")
    j2h.add_argument("--dtype", choices=dtypes, default=None,
                     help="output dtype (default: as stored, bit-exact)")
    j2h.add_argument("--reference-dir", default=None,
                     help="the original Hugging Face directory: its tokenizer files and *.py are copied")
    j2h.add_argument("--config", default=None,
                     help="the model's config.json (default: config.json or a training checkpoint's "
                          "model_config/ item, in --ckpt or up to two levels above)")
    j2h.add_argument("--params-key", default=None,
                     help="path of the parameter tree inside the saved tree, dot-separated, e.g. params or "
                          "state.params (default: the root, or 'params' when the root has it)")
    j2h.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    j2h.set_defaults(run=_jax_to_hf)
    return parser


def _hf_to_jax(args: argparse.Namespace, dtype: DType | None) -> str:
    return convert_hf_to_orbax(args.hf_dir, args.out, dtype=dtype, overwrite=args.overwrite, progress=True)


def _jax_to_hf(args: argparse.Namespace, dtype: DType | None) -> str:
    return convert_orbax_to_hf(args.ckpt, args.out, config_path=args.config, params_key=args.params_key,
                               max_shard_bytes=args.max_shard_size, dtype=dtype, reference_dir=args.reference_dir,
                               overwrite=args.overwrite, progress=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 bad input or usage, 1 a file system that failed)."""
    args = build_parser().parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's informational logs
    try:
        out = args.run(args, DType(args.dtype) if args.dtype else None)
    except (UserError, FileNotFoundError) as e:  # bad input: the user can fix it
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file system that failed us; anything else is a bug and keeps its traceback
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
