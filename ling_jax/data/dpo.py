"""DPO data: preference pairs (jsonl) -> chat template -> padded chosen / rejected rows with response masks.

A record is `{"prompt": ..., "chosen": ..., "rejected": ...}`: `prompt` is a string (one user turn) or a list
of messages ending with a user turn, `chosen` / `rejected` a string (the assistant reply) or a list of messages
continuing the conversation (see `ling_jax.chat.preference_from_record`). Each side is rendered with the chat
template as one conversation, prompt then response, and tokenized in one call.

Each batch is a dict of `[batch_size, seq_len]` int32 arrays, one pair per row index, no packing:
`chosen_inputs`, `chosen_targets`, `chosen_segment_ids`, `chosen_positions` and the same four for `rejected`.
`*_targets` is the next token where that token belongs to the response (its assistant text and end-of-text
token), -100 elsewhere, so the summed log-probability of the targets is the response's log-probability
given the prompt. `*_segment_ids` is 1 on tokens and 0 on padding.

Pairs longer than `seq_len` on either side follow `data.truncation` (`ling_jax.sft_data.Truncation`):
`drop`; `truncate_right` keeps the first `seq_len` tokens of each side (the end of the longer responses is
lost); `truncate_left` cuts the same number of leading prompt tokens from both sides (so both stay conditioned
on the same prompt) and drops the pair when that would cut into a response. Drops and truncations are counted
in `stats()` as for SFT; unusable records stop the run (or are counted under `data.bad_records=skip`).
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np

from ling_jax.config import IGNORE_INDEX
from ling_jax.data import chat
from ling_jax.data import pipeline as data_lib
from ling_jax.data.sft import (
    CountingIterator,
    DataCount,
    Encoder,
    RecordSource,
    Truncation,
    build_pipeline,
    held_out_batches,
    training_batches,
    truncate,
)
from ling_jax.data.tokenizer import Tokenizer

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
                rejected: list[chat.Message]) -> tuple[list[tuple[np.ndarray, np.ndarray]], DataCount | None]:
    """Token ids and response masks of both sides, truncated per `encoder.truncation`.

    Returns:
      `([(ids, mask) chosen, (ids, mask) rejected], count)` with `count` as in `sft_data.truncate`; on a
      DROPPED_* count the arrays are empty.
    """
    sides = [encoder.template.encode(encoder.tokenizer, prompt + r, loss_from=len(prompt), add_bos=encoder.add_bos)
             for r in (chosen, rejected)]
    seq_len, policy = encoder.seq_len, encoder.truncation
    counts = set()
    cut = max(len(ids) for ids, _ in sides) - seq_len
    if policy is Truncation.TRUNCATE_LEFT and cut > 0:  # The same prompt prefix goes from both sides.
        if cut >= min(int(np.argmax(mask)) for _, mask in sides):  # It would reach a response.
            return [(ids[:0], mask[:0]) for ids, mask in sides], DataCount.DROPPED_NO_LOSS
        sides, counts = [(ids[cut:], mask[cut:]) for ids, mask in sides], {DataCount.TRUNCATED}
    out = []
    for ids, mask in sides:
        ids, mask, count = truncate(ids, mask, seq_len, policy)
        out.append((ids, mask))
        counts.add(count)
    for drop in (DataCount.DROPPED_TOO_LONG, DataCount.DROPPED_NO_LOSS):
        if drop in counts:
            return [(ids[:0], mask[:0]) for ids, mask in out], drop
    return out, DataCount.TRUNCATED if DataCount.TRUNCATED in counts else None


class _PairExample:
    """`(epoch, index, record)` -> a pair's padded rows and `counts`, or `{"skip": DataCount | -1}`."""

    def __init__(self, encoder: Encoder, pad_id: int):
        self.encoder, self.pad_id = encoder, pad_id

    def __call__(self, item: tuple[int, int, tuple[str, Any, str | None]]) -> dict[str, Any]:
        _, _, (where, record, error) = item
        enc = self.encoder
        if error is not None:
            return enc.bad(error)
        if record is None:
            return {"skip": -1}  # A blank line.
        try:
            prompt, chosen, rejected = chat.preference_from_record(record, where)
        except chat.ChatFormatError as e:
            return enc.bad(str(e))
        sides, count = encode_pair(enc, prompt, chosen, rejected)
        if count is not None and count is not DataCount.TRUNCATED:
            return {"skip": int(count)}
        out: dict[str, Any] = {"counts": np.zeros(len(DataCount), np.int32)}
        if count is DataCount.TRUNCATED:
            out["counts"][count] += 1
        for side, (ids, mask) in zip(SIDES, sides, strict=True):
            out.update({f"{side}_{k}": v for k, v in _row(ids, mask, enc.seq_len, self.pad_id).items()})
        return out


def _batch(ds: Any, *, batch_size: int) -> Any:
    return ds.batch(batch_size, drop_remainder=True)


def _dpo_pipeline(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer | None, seq_len: int,
                  batch_size: int, seed: int, train: bool, shard: tuple[int, int], num_epochs: int | None,
                  workers: int) -> CountingIterator:
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1; got {seq_len}, {batch_size}")
    encoder = Encoder.from_config(data_cfg, tokenizer, seq_len)
    source = RecordSource(data_cfg)
    indices = data_lib.document_indices(len(source), float(data_cfg.get("eval_fraction", 0.0)), train=train,
                                        shard=shard)
    pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    return build_pipeline(data_cfg, source, indices, _PairExample(encoder, pad_id), seed=seed,
                          num_epochs=num_epochs, workers=workers, what="training" if train else "held-out",
                          batch=functools.partial(_batch, batch_size=batch_size))


make_dpo_iterator = functools.partial(training_batches, _dpo_pipeline)  # DPO pair batches of one process.
make_dpo_eval_batches = functools.partial(held_out_batches, _dpo_pipeline)  # Held-out DPO pair batches.
