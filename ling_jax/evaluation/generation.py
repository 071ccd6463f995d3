"""Batched sampling of completions through the KV cache and the jitted decode loop (`inference.decoding`).

Rows (problem, sample) are sorted by prompt length and cut into batches of `batch_size`; each
batch is left-padded to a multiple of `LENGTH_BUCKET` tokens and a short last batch is filled up
with copies of its last row, so that few shapes compile. A row stops at the tokenizer's stop token
(EOS, or the chat template's end of text); stop sequences are applied afterwards to the decoded
text (`Problem.cut_text`). Greedy decoding (temperature 0, the default, as in the paper) is
deterministic; sampling draws from `jax.random.fold_in(key(seed), batch)`.

`max_new_tokens` is the problem's own (512 for completions, 64 / 256 for single / multi-line holes)
unless given; when it is at least half the model's `max_position_embeddings` (tiny test models)
it is lowered to half, and the prompt gets the other half (`prompts` truncates and counts).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ling_jax.evaluation.problems import Problem
from ling_jax.evaluation.prompts import PromptBuilder, cut_at_stop
from ling_jax.inference.decoding import generate, left_pad

LENGTH_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How many samples per problem and how they are drawn.

    Attributes:
      n: samples per problem.
      temperature: 0 for greedy decoding.
      top_p: nucleus mass (None: off).
      seed: seed of the sampling draws.
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Generated:
    """One generated sample.

    Attributes:
      problem: index of its problem.
      sample: its index among the problem's samples.
      text: the decoded new text, up to the stop token.
      new_tokens: tokens generated up to the stop token.
      dropped_prompt_tokens: prompt tokens dropped to fit the model's positions.
      max_new_tokens: the new-token budget it had.
    """

    problem: int
    sample: int
    text: str
    new_tokens: int
    dropped_prompt_tokens: int
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    """Totals of one `generate_samples` call (for the summary and the benchmark)."""

    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of wall clock (compiles included)."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def new_token_budget(problem: Problem, max_positions: int, override: int | None) -> int:
    """The new tokens a problem gets: `override` or its own, at most half the model's positions."""
    wanted = override if override is not None else problem.max_new_tokens
    return max(1, min(wanted, max_positions // 2))


def _batches(rows: list[tuple[int, int, list[int], int]], batch_size: int):
    """Rows (problem, sample, ids, dropped) sorted longest first, in chunks of `batch_size`."""
    rows = sorted(rows, key=lambda r: (-len(r[2]), r[0], r[1]))
    for start in range(0, len(rows), batch_size):
        yield rows[start:start + batch_size]


def _padded(prompts: list[list[int]], batch_size: int, max_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """`decoding.left_pad` of `batch_size` rows (the last prompt repeated), widened to a `LENGTH_BUCKET` multiple."""
    rows = [prompts[min(i, len(prompts) - 1)] for i in range(batch_size)]
    ids, mask = left_pad(rows, pad)  # [B, T]
    T = min(max_len, -(-ids.shape[1] // LENGTH_BUCKET) * LENGTH_BUCKET)
    widen = ((0, 0), (T - ids.shape[1], 0))
    return np.pad(ids, widen, constant_values=pad), np.pad(mask, widen)


def decode_rows(model: Any, params: Any, prompts: list[list[int]], *, max_new_tokens: int,
                eos: int | Sequence[int] | None,
                pad: int, temperature: float = 0.0, top_p: float | None = None, rng: jax.Array | None = None,
                batch_size: int | None = None) -> list[list[int]]:
    """New token ids of each prompt (one batch, left-padded to a `LENGTH_BUCKET` multiple), cut after a stop id.

    Args:
      model: a `LingForCausalLM`.
      params: its parameters.
      prompts: token ids, each at most `max_position_embeddings - max_new_tokens` long.
      max_new_tokens: tokens to add.
      eos: the stop token, or several (any ends a row; None or empty: none); kept as the last id of a row
        that produced it.
      pad: the padding id.
      temperature: 0 for greedy.
      top_p: nucleus mass.
      rng: the sampling key.
      batch_size: rows to decode (>= len(prompts); extra rows repeat the last prompt and are dropped).
    """
    stops = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    B = batch_size or len(prompts)
    ids, mask = _padded(prompts, B, model.config.max_position_embeddings - max_new_tokens, pad)
    result = generate(model, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask), max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, eos_token_id=list(stops) or -1, rng=rng)
    rows = [[int(t) for t in row] for row in np.asarray(result)[: len(prompts), ids.shape[1]:]]
    return [cut_at_stop(row, stops, keep=True) for row in rows]


def generate_samples(model: Any, params: Any, builder: PromptBuilder, problems: Sequence[Problem],
                     sampling: Sampling = Sampling(), *, batch_size: int = 8, max_new_tokens: int | None = None,
                     progress: bool = False) -> tuple[list[Generated], GenerationStats]:
    """Generates `sampling.n` samples for every problem.

    Args:
      model: a `LingForCausalLM`.
      params: its parameters.
      builder: the prompt builder (tokenizer, chat / FIM format).
      problems: the problems.
      sampling: samples per problem and how they are drawn.
      batch_size: rows per decode batch.
      max_new_tokens: new tokens of every problem (None: each problem's own).
      progress: show a progress bar over samples.

    Returns:
      The samples, ordered by (problem, sample), and the generation totals.
    """
    max_positions = model.config.max_position_embeddings
    eos = builder.stop_ids()
    groups: dict[int, list] = {}
    for index, problem in enumerate(problems):
        new = new_token_budget(problem, max_positions, max_new_tokens)
        ids, dropped = builder.ids(problem, max_positions - new)
        groups.setdefault(new, []).extend((index, s, ids, dropped) for s in range(sampling.n))
    out, tokens, start, batch_no = [], 0, time.monotonic(), 0
    bar = tqdm(total=len(problems) * sampling.n, desc="generating", unit="sample", disable=not progress)
    for new, rows in sorted(groups.items()):
        for batch in _batches(rows, batch_size):
            news = decode_rows(model, params, [r[2] for r in batch], max_new_tokens=new, eos=eos,
                               pad=builder.tokenizer.padding_id, temperature=sampling.temperature,
                               top_p=sampling.top_p, rng=jax.random.fold_in(jax.random.key(sampling.seed), batch_no),
                               batch_size=batch_size)
            batch_no += 1
            for (index, sample, _, dropped), row in zip(batch, news, strict=True):
                tokens += len(row)
                out.append(Generated(index, sample, builder.decode(row), len(row), dropped, new))
            bar.update(len(batch))
    bar.close()
    out.sort(key=lambda g: (g.problem, g.sample))
    return out, GenerationStats(tokens, time.monotonic() - start)
