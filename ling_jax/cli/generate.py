"""Command line: generate text from a checkpoint.

    python -m ling_jax.cli.generate --model CKPT_DIR --prompt "def fib(n):" --max-new-tokens 64

`--model` is any checkpoint `ling_jax.from_pretrained` loads: a Hub id
`org/name[@revision]` (fetched into the Hugging Face cache; `HF_HUB_OFFLINE=1`
reads the cache only), a Hugging Face directory (config.json + safetensors), a
`convert_weights.py hf-to-jax` output,
or a `train.py` workdir or checkpoint step (`ling_jax.io.loading`). The
tokenizer is read from `--tokenizer` (a SentencePiece `.model`, a
`tokenizer.json`, or a directory) and defaults to the model directory (for a
train.py step: the run's tokenizer, kept in its workdir).
`--prompt-ids 1,2,3` skips the tokenizer. Several `--prompt`s make a
left-padded batch. Bad input (ids outside the vocabulary, a prompt longer than
`max_position_embeddings`) is rejected before any weights are loaded; errors
in the input are printed in one line and exit with status 2.

`--chat` treats each `--prompt` as a user message and renders it with the
checkpoint's own chat template (`chat_template` in tokenizer_config.json, or
chat_template.jinja; `ling_jax.data.chat_template`), else with the Ling template
(`ling_jax.data.chat`); `--system` adds a system message and `--chat-kwargs`
passes the template's switches, so a chat / SFT / DPO model answers as it was
trained; generation stops at the template's end-of-turn token. Sampling
defaults and the stop ids come from the checkpoint's generation_config.json
(flags override):

    python -m ling_jax.cli.generate --model EXPORT_DIR --chat --system "Be brief." --prompt "Sort a list in Python."

`--fim --prefix-file F --suffix-file F` fills in the middle between the two
files' text (`ling_jax.complete`: the tokenizer's FIM sentinels, `--fim-format`
psm or spm, stop at the end-of-middle) and prints the middle.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import DType, UserError
from ling_jax.inference.decoding import generate, left_pad
from ling_jax.io.generation_config import GenerationDefaults
from ling_jax.io.hub import local_path
from ling_jax.io.loading import from_pretrained, resolve_checkpoint
from ling_jax.model.quantization import Quantization

PROG = "python -m ling_jax.cli.generate"


class PromptError(UserError):
    """A prompt the model cannot take (not integers, empty, outside the vocabulary, too long)."""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="checkpoint: a Hub id org/name[@revision], or a directory (Hugging Face, convert_weights.py "
                        "output, train.py workdir or step)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[],
                   help="comma-separated token ids instead of text (repeat for a batch)")
    p.add_argument("--tokenizer", help="tokenizer file, directory or Hub id (default: --model's)")
    p.add_argument("--max-new-tokens", type=int,
                   help="new tokens per prompt (default: the checkpoint's generation_config.json, else 64)")
    p.add_argument("--temperature", type=float,
                   help="0 = greedy (default: the checkpoint's generation_config.json: greedy unless do_sample, "
                        "then its temperature, else 1.0; without one, greedy)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest (default: generation_config.json's "
                                             "when sampling, else 50 as transformers; none when greedy)")
    p.add_argument("--top-p", type=float, help="nucleus mass (default: generation_config.json's, else none)")
    p.add_argument("--eos-token-id", type=int, action="append",
                   help="stop at this id (repeat for several; default: generation_config.json's eos_token_id list, "
                        "else config.json's; with --chat also the template's end-of-turn token)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", choices=[d.value for d in DType], default=DType.BFLOAT16.value,
                   help=f"compute and parameter dtype (default: {DType.BFLOAT16.value})")
    p.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's bos token")
    p.add_argument("--quantize", choices=[q.value for q in Quantization],
                   help="int8 weights (dequantized in the matmuls)")
    p.add_argument("--quantize-group-size", type=int, help="with --quantize: one scale per this many input rows")
    p.add_argument("--chat", action="store_true",
                   help="render each --prompt as a user turn of the checkpoint's chat template (tokenizer_config.json "
                        "or chat_template.jinja; else the Ling template), for SFT / DPO / chat models")
    p.add_argument("--system", help="with --chat: a system message before the user turn")
    p.add_argument("--chat-kwargs", default="", metavar="JSON",
                   help="with --chat: the template's own switches, e.g. '{\"enable_thinking\": false}'")
    p.add_argument("--show-prompt", action="store_true", help="print each prompt as the model sees it")
    p.add_argument("--fim", action="store_true", help="fill in the middle between --prefix-file and --suffix-file")
    p.add_argument("--prefix-file", help="with --fim: the text before the cursor")
    p.add_argument("--suffix-file", help="with --fim: the text after the cursor")
    p.add_argument("--fim-format", choices=["psm", "spm"], default="psm", help="with --fim: the FIM layout")
    args = p.parse_args(argv)
    if args.fim:
        if not (args.prefix_file and args.suffix_file) or args.prompt or args.prompt_ids or args.chat:
            p.error("--fim takes --prefix-file and --suffix-file (and no --prompt, --prompt-ids or --chat)")
        return args
    if args.prefix_file or args.suffix_file:
        p.error("--prefix-file and --suffix-file need --fim")
    if bool(args.prompt) == bool(args.prompt_ids):
        p.error("give either --prompt or --prompt-ids (one or more times)")
    if (args.chat or args.system is not None) and args.prompt_ids:
        p.error("--chat and --system render text prompts; they do not apply to --prompt-ids")
    if (args.system is not None or args.chat_kwargs) and not args.chat:
        p.error("--system and --chat-kwargs need --chat")
    return args


def _prompts(args: argparse.Namespace, vocab_size: int, max_len: int, tokenizer_dir: str, max_new_tokens: int):
    """Token id lists, the tokenizer (None with --prompt-ids) and the stop id of --chat / --fim (else None).

    Raises:
      PromptError: a bad prompt (before any weights are loaded); TokenizerError, ChatFormatError.
    """
    tokenizer, stop = None, None
    if args.prompt_ids:
        try:
            prompts = [[int(t) for t in s.split(",") if t.strip()] for s in args.prompt_ids]
        except ValueError as e:
            raise PromptError(f"--prompt-ids must be comma-separated integers: {e}") from None
    else:
        from ling_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(local_path(args.tokenizer, "--tokenizer", tokenizer_only=True) if args.tokenizer
                                   else tokenizer_dir)
        add_bos = not args.no_bos and tokenizer.bos_id is not None
        if args.fim:
            from ling_jax.inference.completion import check_fim_length, fim_prompt

            try:
                prefix, suffix = (pathlib.Path(f).read_text(encoding="utf-8")
                                  for f in (args.prefix_file, args.suffix_file))
            except OSError as e:
                raise PromptError(f"--prefix-file / --suffix-file: cannot read {e.filename}: {e.strerror}") from None
            prompts = [fim_prompt(tokenizer, prefix, suffix, fim_format=args.fim_format, add_bos=add_bos)]
            check_fim_length(len(prompts[0]), max_new_tokens, max_len)
            stop = tokenizer.eos_id  # the middle ends at the EOS that closed every FIM document
        elif args.chat:
            from ling_jax.data.chat import Message, Role
            from ling_jax.data.chat_template import chat_template_for

            template = chat_template_for(tokenizer, {"template_kwargs": args.chat_kwargs})  # checkpoint's, else Ling's
            stop = template.check_tokenizer(tokenizer)
            system = [Message(Role.SYSTEM, args.system)] if args.system is not None else []
            prompts = [template.prompt_ids(tokenizer, [*system, Message(Role.USER, t)], add_bos=add_bos)
                       for t in args.prompt]
        else:
            prompts = [tokenizer.encode(t, add_bos=add_bos) for t in args.prompt]
    for i, ids in enumerate(prompts):
        if not ids:
            raise PromptError(f"prompt {i} is empty: give a non-empty --prompt or --prompt-ids")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"prompt {i} has token ids outside the model vocabulary [0, {vocab_size}): "
                             f"{bad[:10]}; check that the tokenizer matches the model")
        if len(ids) + max_new_tokens > max_len:
            raise PromptError(f"prompt {i} has {len(ids)} tokens; with --max-new-tokens "
                             f"{max_new_tokens} that exceeds max_position_embeddings {max_len}")
    return prompts, tokenizer, stop


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    args = _parse(argv)
    try:
        ckpt = resolve_checkpoint(args.model, "--model")
        config = ckpt.config()
        gen = GenerationDefaults.from_dir(ckpt.path).resolve(  # the checkpoint's defaults; flags win
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
        prompts, tokenizer, stop = _prompts(args, config.vocab_size, config.max_position_embeddings,
                                            ckpt.tokenizer_dir, gen.max_new_tokens)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ids, mask = left_pad(prompts, config.pad_token_id or 0)
    T = ids.shape[1]
    try:
        model, params = from_pretrained(ckpt.path, dtype=DType(args.dtype).jnp, quantize=args.quantize,
                                        quantize_group_size=args.quantize_group_size, progress=True)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # A reply ends at --eos-token-id, else any of generation_config.json's eos ids (else config.json's), and with
    # --chat at the template's end-of-turn token.
    eos = list(args.eos_token_id or gen.eos_token_ids or ([config.eos_token_id] if config.eos_token_id is not None
                                                         else []))
    eos += [stop] if stop is not None and stop not in eos else []
    out = generate(model, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                   max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_k=gen.top_k,
                   top_p=gen.top_p, eos_token_id=eos or -1, rng=jax.random.key(args.seed))
    for i, row in enumerate(np.asarray(out)):
        new = [int(t) for t in row[T:]]
        new = new[: next((j for j, t in enumerate(new) if t in eos), len(new))]
        text = tokenizer.decode_generated(new) if tokenizer else ",".join(map(str, new))
        if args.show_prompt:
            print(f"[{i}] prompt: {tokenizer.decode(prompts[i], skip_special_tokens=False) if tokenizer else ''}")
        print(f"[{i}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
