"""`ling_jax` as a model of EleutherAI's lm-eval harness: `loglikelihood`, `loglikelihood_rolling`, `generate_until`.

Importing this module registers the model under the name `ling_jax`; `python -m
ling_jax.evaluation.lm_eval_cli` is the `lm_eval` command with it registered:

    python -m ling_jax.evaluation.lm_eval_cli run --model ling_jax \\
        --model_args pretrained=PATH,dtype=bfloat16 --tasks hellaswag

`pretrained` is anything `from_pretrained` loads; `tokenizer` (default: the checkpoint directory),
`dtype` (`float32`, `bfloat16`, ...), `batch_size` and `max_length` (default: the model's
`max_position_embeddings`) are the other model arguments. Needs the `lm_eval` extra
(`pip install "ling_jax[lm_eval]"`).

Scoring runs batches of right-padded rows through a jitted forward pass (float32 logits,
log-softmax in float32); rows longer than `max_length` keep their last `max_length` tokens, as
lm-eval's Hugging Face model does. Generation goes through the KV-cache decode loop
(`generation.decode_rows`), stops at EOS and at any `until` string (cut afterwards).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ling_jax.config import DType
from ling_jax.data.tokenizer import load_tokenizer
from ling_jax.evaluation.generation import LENGTH_BUCKET, decode_rows
from ling_jax.io.loading import from_pretrained, resolve_checkpoint

DEFAULT_GEN_TOKENS = 256


@functools.partial(jax.jit, static_argnames="model")
def _token_logprobs(model: Any, params: Any, ids: jax.Array, mask: jax.Array, targets: jax.Array):
    """Log-probability of each target token [B, T] and whether it is the argmax [B, T]."""
    logits = model.apply({"params": params}, ids, attention_mask=mask)  # [B, T, V] float32
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


@register_model("ling_jax")
class LingJaxLM(TemplateLM):
    """A `ling_jax` checkpoint as an lm-eval `LM` (see the module docstring)."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, dtype: str = "float32",
                 batch_size: int | str = 8, max_length: int | None = None, max_gen_toks: int = DEFAULT_GEN_TOKENS,
                 add_bos_token: bool = False, **_: Any) -> None:
        super().__init__()
        ckpt = resolve_checkpoint(pretrained, "pretrained=")
        self.model, self.params = from_pretrained(ckpt.path, dtype=DType(str(dtype)).jnp)
        self.tokenizer = load_tokenizer(tokenizer or ckpt.tokenizer_dir)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() == "true"

    @property
    def eot_token_id(self) -> int:
        """EOS (the padding id when the tokenizer has none)."""
        eos = self.tokenizer.eos_id
        return self.tokenizer.padding_id if eos is None else eos

    @property
    def prefix_token_id(self) -> int:
        """The token that conditions an empty context: BOS when there is one, else EOS."""
        bos = self.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer file, for lm-eval's cache keys."""
        return str(self.tokenizer.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        """Token ids of `string` (BOS only when asked for)."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=bool(add) and self.tokenizer.bos_id is not None)

    def tok_decode(self, ids: list[int]) -> str:
        """Text of ids inside the tokenizer's vocabulary."""
        return self.tokenizer.decode([t for t in ids if 0 <= t < self.tokenizer.vocab_size])

    def score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum of log-probs, all greedy) of the last `n` tokens of each (tokens, n) row, batched.

        A row is the context followed by the continuation; its last `max_length + 1` tokens are kept.
        """
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            cut = [(rows[i][0][-(self.max_length + 1):], rows[i][1]) for i in chunk]
            T = min(self.max_length, -(-max(len(t) - 1 for t, _ in cut) // LENGTH_BUCKET) * LENGTH_BUCKET)
            ids = np.zeros((self.batch_size, T), np.int32)  # [B, T], right-padded
            mask = np.zeros((self.batch_size, T), np.int32)
            targets = np.zeros((self.batch_size, T), np.int32)
            for r, (tokens, _) in enumerate(cut):
                ids[r, : len(tokens) - 1], targets[r, : len(tokens) - 1] = tokens[:-1], tokens[1:]
                mask[r, : len(tokens) - 1] = 1
            mask[len(cut):, 0] = 1  # filler rows: one real token, unused
            logp, greedy = (np.asarray(a) for a in _token_logprobs(self.model, self.params, jnp.asarray(ids),
                                                                  jnp.asarray(mask), jnp.asarray(targets)))
            for r, (i, (tokens, n)) in enumerate(zip(chunk, cut, strict=True)):
                end = len(tokens) - 1
                n = min(n, end)
                out[i] = (float(logp[r, end - n:end].sum()), bool(greedy[r, end - n:end].all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        rows = [(list(ctx) + list(cont), len(cont)) for _, ctx, cont in requests]
        return self.score_rows(rows)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in disjoint windows of at most `max_length` tokens."""
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text, add_special_tokens=False), self.prefix_token_id, self.max_length, 1)]
            scores = self.score_rows([(ctx + cont, len(cont)) for ctx, cont in windows])
            results.append(sum(s for s, _ in scores))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `temperature` > 0 and `do_sample`) continuations, cut at `until`."""
        out = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = min(int(kwargs.get("max_gen_toks", self.max_gen_toks)), self.max_length // 2)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-(self.max_length - new):] or [self.prefix_token_id]
            row = decode_rows(self.model, self.params, [ids], max_new_tokens=new, eos=self.tokenizer.eos_id,
                              pad=self.tokenizer.padding_id, temperature=temperature, rng=jax.random.key(0))[0]
            text = self.tok_decode(row)
            at = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
            out.append(text[:at])
        return out
