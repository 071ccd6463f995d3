"""Supervised fine-tuning data: chat jsonl -> Ling chat template -> packed rows with an assistant-only loss.

Pipeline (one per process; `make_sft_iterator`):

    records of this process's shard (jsonl lines), minus the held-out ones
    -> global shuffle by seed (reshuffled every epoch) -> repeat `num_epochs`
    -> parse + render with the chat template + tokenize + truncate (`Truncation`)
    -> drop and count (`ling_jax.data.counting`) -> first-fit pack into rows of `seq_len` -> batch

A record is `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` or
`{"prompt": ..., "response": ...[, "system": ...]}` (see `ling_jax.data.chat`). Batches are dicts of
`[batch_size, seq_len]` int32 arrays as in pre-training (`inputs`, `targets`, `segment_ids`, `positions`), so
`ling_jax.train.step.train_step` trains on them unchanged: `targets` is -100 except where the next token is an
assistant token (reply text and its end-of-text token). Conversations are packed whole (first fit, padded), each
its own segment, so attention never crosses conversations.

Records longer than `seq_len` follow `data.truncation`; a record that keeps no assistant token is dropped.
A record that cannot be used (bad JSON, unknown role, no assistant turn, ...) stops the run with a message naming
the file and line, or, with `data.bad_records=skip`, is dropped. Every drop and truncation is counted in the
iterator's `stats()` and in its checkpointed state, so the counts survive a resume exactly. Blank lines are not
records.

What SFT and DPO (`ling_jax.data.dpo`) share is here: `truncate`, `Encoder`, `RecordExample` and
`record_pipeline`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np

from ling_jax.config import ConfigError
from ling_jax.data import chat
from ling_jax.data.chat_template import JinjaChatTemplate, chat_template_for
from ling_jax.data.counting import Count, CountedIterator, dropped, tally
from ling_jax.data.packing import pack_and_batch
from ling_jax.data.pipeline import build_pipeline, document_indices, held_out_batches, training_batches
from ling_jax.data.settings import BadRecords, PackingKind, Truncation, default_post_training_data_config, option
from ling_jax.data.sources import RecordSource
from ling_jax.data.tokenizer import Tokenizer

__all__ = ["BadRecords", "Encoder", "RecordExample", "Truncation", "default_post_training_data_config",
           "make_sft_eval_batches", "make_sft_iterator", "record_pipeline", "truncate"]


def truncate(ids: np.ndarray, mask: np.ndarray, seq_len: int, policy: Truncation, cut: int | None = None,
             ) -> tuple[np.ndarray, np.ndarray, Count | None]:
    """Fits a record into `seq_len` tokens.

    Args:
      ids: Token ids `[n]`.
      mask: Loss mask `[n]` (true on the assistant / response tokens).
      seq_len: The row length.
      policy: The truncation policy.
      cut: TRUNCATE_LEFT only: drop exactly this many leading tokens (default `n - seq_len`); DPO cuts
        the same prompt prefix from both responses.

    Returns:
      `(ids, mask, count)`: the kept tokens and what happened (None: untouched; TRUNCATED; or
      DROPPED_TOO_LONG / DROPPED_NO_LOSS, with empty arrays). A kept record has a loss token after its
      first token.
    """
    n = len(ids)
    if n <= seq_len:
        count = None
    elif policy is Truncation.DROP:
        return ids[:0], mask[:0], Count.DROPPED_TOO_LONG
    else:
        start = (n - seq_len if cut is None else cut) if policy is Truncation.TRUNCATE_LEFT else 0
        ids, mask, count = ids[start : start + seq_len], mask[start : start + seq_len], Count.TRUNCATED
    if not mask[1:].any():
        return ids[:0], mask[:0], Count.DROPPED_NO_LOSS
    return ids, mask, count


@dataclasses.dataclass(frozen=True)
class Encoder:
    """What turns a record into tokens: the tokenizer, the template and the policies."""

    tokenizer: Tokenizer
    template: chat.ChatTemplate | JinjaChatTemplate
    seq_len: int
    truncation: Truncation
    bad_records: BadRecords
    add_bos: bool

    @classmethod
    def from_config(cls, data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None, seq_len: int) -> Encoder:
        """The encoder of `data_cfg` (`chat`, `truncation`, `bad_records`, `add_bos`).

        Raises:
          ConfigError: No tokenizer, a bad choice, `seq_len` < 2.
          ChatFormatError: The tokenizer does not have the template's end-of-text token.
        """
        if tokenizer is None:
            raise ConfigError("post-training data needs a tokenizer: set data.tokenizer")
        if seq_len < 2:
            raise ConfigError(f"seq_len={seq_len}; post-training rows need seq_len >= 2")
        template = chat_template_for(tokenizer, option(data_cfg, "chat"))  # the checkpoint's own, else Ling's
        template.check_tokenizer(tokenizer)
        return cls(tokenizer, template, seq_len, option(data_cfg, "truncation", Truncation),
                   option(data_cfg, "bad_records", BadRecords), bool(option(data_cfg, "add_bos")))

    def bad(self, message: str) -> dict[str, Any]:
        """The element of an unusable record (or the error, under BadRecords.ERROR)."""
        if self.bad_records is BadRecords.ERROR:
            raise chat.ChatFormatError(f"{message}. Fix the record, or set data.bad_records=skip to drop and "
                                       "count such records")
        return dropped(Count.DROPPED_MALFORMED)


class RecordExample(abc.ABC):
    """`(epoch, index, (where, record, error))` -> a kept element with `counts`, or `dropped(...)`.

    What SFT and DPO share: bad JSON and records that do not parse go to `Encoder.bad`, blank lines are
    dropped uncounted; subclasses parse, encode and batch.
    """

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, item: tuple[int, int, tuple[str, Any, str | None]]) -> dict[str, Any]:
        _, _, (where, record, error) = item
        if error is not None:
            return self.encoder.bad(error)
        if record is None:
            return dropped(None)  # A blank line is not a record.
        try:
            parsed = self.parse(record, where)
        except chat.ChatFormatError as e:
            return self.encoder.bad(str(e))
        return self.encode(parsed)

    @abc.abstractmethod
    def parse(self, record: Any, where: str) -> Any:
        """The record's messages; `ChatFormatError` naming `where` if it has none usable."""

    @abc.abstractmethod
    def encode(self, parsed: Any) -> dict[str, Any]:
        """The kept element of parsed messages (with `counts`), or `dropped(...)`."""

    @abc.abstractmethod
    def batches(self, batch_size: int) -> Callable[[grain.IterDataset], grain.IterDataset]:
        """Kept elements -> batches of `batch_size` (with the summed `counts`)."""


def record_pipeline(example: type[RecordExample], data_cfg: ml_collections.ConfigDict, *,
                    tokenizer: Tokenizer | None, seq_len: int, batch_size: int, seed: int, train: bool,
                    shard: tuple[int, int], num_epochs: int | None, workers: int) -> CountedIterator:
    """The SFT or DPO pipeline (`example` says which) over the train (or held-out) records of `shard`."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}; need batch_size >= 1")
    encoder = Encoder.from_config(data_cfg, tokenizer, seq_len)
    source = RecordSource(data_cfg)
    indices = document_indices(len(source), float(option(data_cfg, "eval_fraction")), train=train, shard=shard)
    mapper = example(encoder)
    return build_pipeline(data_cfg, source, indices, mapper, batch=mapper.batches(batch_size), seed=seed,
                          num_epochs=num_epochs, workers=workers,
                          what=f"training records (shard {shard[0]} of {shard[1]})" if train else "held-out records",
                          fix="check the records and data.truncation")


class _SftExample(RecordExample):
    """A conversation -> `{"inputs", "loss_mask", "counts"}` (truncated per `data.truncation`)."""

    def parse(self, record: Any, where: str) -> list[chat.Message]:
        return chat.conversation_from_record(record, where)

    def encode(self, parsed: list[chat.Message]) -> dict[str, Any]:
        enc = self.encoder
        ids, mask = enc.template.encode(enc.tokenizer, parsed, add_bos=enc.add_bos)
        ids, mask, count = truncate(ids, mask, enc.seq_len, enc.truncation)
        if count is not None and count is not Count.TRUNCATED:
            return dropped(count)
        return {"inputs": ids, "loss_mask": mask.astype(np.int32), "counts": tally(count)}

    def batches(self, batch_size: int) -> Callable[[grain.IterDataset], grain.IterDataset]:
        return functools.partial(pack_and_batch, kind=PackingKind.FIRST_FIT, seq_len=self.encoder.seq_len,
                                 batch_size=batch_size, pad_id=self.encoder.tokenizer.padding_id,
                                 features=("inputs", "loss_mask"))


def _sft_pipeline(data_cfg: ml_collections.ConfigDict, **kwargs: Any) -> CountedIterator:
    """`record_pipeline` of conversations; `data.packing` must be first_fit."""
    packing = option(data_cfg, "packing", PackingKind)
    if packing is not PackingKind.FIRST_FIT:
        raise ConfigError(f"SFT packs whole conversations, so data.packing={packing.value} is not supported; "
                          "set data.packing=first_fit")
    return record_pipeline(_SftExample, data_cfg, **kwargs)


# SFT training batches of one process: `make_sft_iterator(data_cfg, *, tokenizer, seq_len, batch_size, seed,
# process_index=0, process_count=1)`; see `pipeline.training_batches`.
make_sft_iterator = functools.partial(training_batches, _sft_pipeline)
# Held-out SFT batches: `make_sft_eval_batches(data_cfg, *, tokenizer, seq_len, batch_size, num_batches, seed)`.
make_sft_eval_batches = functools.partial(held_out_batches, _sft_pipeline)
