"""DPO data: preference pairs (jsonl) -> chat template -> padded chosen / rejected rows with response masks.

A record is `{"prompt": ..., "chosen": ..., "rejected": ...}`: `prompt` is a string (one user turn) or a list
of messages ending with a user turn, `chosen` / `rejected` a string (the assistant reply) or a list of messages
continuing the conversation (see `ling_jax.data.chat.preference_from_record`). Each side is rendered with the chat
template as one conversation, prompt then response, and tokenized in one call.

Each batch is a dict of `[batch_size, seq_len]` int32 arrays, one pair per row index, no packing:
`chosen_inputs`, `chosen_targets`, `chosen_segment_ids`, `chosen_positions` and the same four for `rejected`.
`*_targets` is the next token where that token belongs to the response (its assistant text and end-of-text
token), -100 elsewhere, so the summed log-probability of the targets is the response's log-probability
given the prompt. `*_segment_ids` is 1 on tokens and 0 on padding.

Pairs longer than `seq_len` on either side follow `data.truncation` (`ling_jax.data.settings.Truncation`):
`drop`; `truncate_right` keeps the first `seq_len` tokens of each side (the end of the longer responses is
lost); `truncate_left` cuts the same number of leading prompt tokens from both sides (so both stay conditioned
on the same prompt) and drops the pair when that would cut into a response. Drops and truncations are counted
in `stats()` as for SFT; unusable records stop the run (or are counted under `data.bad_records=skip`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from ling_jax.config import IGNORE_INDEX
from ling_jax.data import chat
from ling_jax.data.counting import Count, dropped, tally
from ling_jax.data.pipeline import held_out_batches, training_batches
from ling_jax.data.settings import Truncation
from ling_jax.data.sft import Encoder, RecordExample, record_pipeline, truncate

__all__ = ["SIDES", "encode_pair", "make_dpo_eval_batches", "make_dpo_iterator"]

SIDES = ("chosen", "rejected")


def _row(ids: np.ndarray, mask: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One padded row: inputs, targets (response tokens only), segment ids, positions."""
    n = len(ids)
    inputs = np.full(seq_len, pad_id, np.int32)
    inputs[:n] = ids
    targets = np.full(seq_len, IGNORE_INDEX, np.int32)
    targets[: n - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    segment_ids = (np.arange(seq_len) < n).astype(np.int32)
    positions = np.where(segment_ids > 0, np.arange(seq_len), 0).astype(np.int32)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions}


def encode_pair(encoder: Encoder, prompt: list[chat.Message], chosen: list[chat.Message],
                rejected: list[chat.Message]) -> tuple[list[tuple[np.ndarray, np.ndarray]], Count | None]:
    """Token ids and response masks of both sides, truncated per `encoder.truncation`.

    Returns:
      `([(ids, mask) chosen, (ids, mask) rejected], count)` with `count` as in `sft.truncate`; on a
      DROPPED_* count the arrays are empty.
    """
    sides = [encoder.template.encode(encoder.tokenizer, prompt + r, loss_from=len(prompt), add_bos=encoder.add_bos)
             for r in (chosen, rejected)]
    seq_len, policy = encoder.seq_len, encoder.truncation
    counts = set()
    cut = max(len(ids) for ids, _ in sides) - seq_len
    if policy is Truncation.TRUNCATE_LEFT and cut > 0:  # The same prompt prefix goes from both sides.
        if cut >= min(int(np.argmax(mask)) for _, mask in sides):  # It would reach a response.
            return [(ids[:0], mask[:0]) for ids, mask in sides], Count.DROPPED_NO_LOSS
        sides, counts = [(ids[cut:], mask[cut:]) for ids, mask in sides], {Count.TRUNCATED}
    out = []
    for ids, mask in sides:
        ids, mask, count = truncate(ids, mask, seq_len, policy)
        out.append((ids, mask))
        counts.add(count)
    for drop in (Count.DROPPED_TOO_LONG, Count.DROPPED_NO_LOSS):
        if drop in counts:
            return [(ids[:0], mask[:0]) for ids, mask in out], drop
    return out, Count.TRUNCATED if Count.TRUNCATED in counts else None


class _PairExample(RecordExample):
    """A preference pair -> its padded chosen / rejected rows and `counts`, or `dropped(...)`."""

    def parse(self, record: Any, where: str) -> tuple[list[chat.Message], list[chat.Message], list[chat.Message]]:
        return chat.preference_from_record(record, where)

    def encode(self, parsed: tuple[list[chat.Message], list[chat.Message], list[chat.Message]]) -> dict[str, Any]:
        sides, count = encode_pair(self.encoder, *parsed)
        if count is not None and count is not Count.TRUNCATED:
            return dropped(count)
        out: dict[str, Any] = {"counts": tally(count)}
        pad_id = self.encoder.tokenizer.padding_id
        for side, (ids, mask) in zip(SIDES, sides, strict=True):
            out.update({f"{side}_{k}": v for k, v in _row(ids, mask, self.encoder.seq_len, pad_id).items()})
        return out

    def batches(self, batch_size: int) -> Callable[[grain.IterDataset], grain.IterDataset]:
        return functools.partial(_batch, batch_size=batch_size)


def _batch(ds: grain.IterDataset, *, batch_size: int) -> grain.IterDataset:
    """One padded pair per row index, no packing."""
    return ds.batch(batch_size, drop_remainder=True)


_dpo_pipeline = functools.partial(record_pipeline, _PairExample)  # `record_pipeline` of preference pairs.
# DPO pair batches of one process: `make_dpo_iterator(data_cfg, *, tokenizer, seq_len, batch_size, seed,
# process_index=0, process_count=1)`; see `pipeline.training_batches`.
make_dpo_iterator = functools.partial(training_batches, _dpo_pipeline)
# Held-out DPO pair batches: `make_dpo_eval_batches(data_cfg, *, tokenizer, seq_len, batch_size, num_batches, seed)`.
make_dpo_eval_batches = functools.partial(held_out_batches, _dpo_pipeline)
