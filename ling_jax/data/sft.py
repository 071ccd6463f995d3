"""Supervised fine-tuning data: chat jsonl -> Ling chat template -> packed rows with an assistant-only loss.

Pipeline (one per process; `make_sft_iterator`):

    records of this process's shard (jsonl lines), minus the held-out ones
    -> global shuffle by seed (reshuffled every epoch) -> repeat `num_epochs`
    -> parse + render with the chat template + tokenize + truncate (`Truncation`)
    -> count dropped / truncated records -> first-fit pack into rows of `seq_len` -> batch

A record is `{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` or
`{"prompt": ..., "response": ...[, "system": ...]}` (see `ling_jax.chat`). Batches are dicts of
`[batch_size, seq_len]` int32 arrays as in pre-training (`inputs`, `targets`, `segment_ids`, `positions`), so
`ling_jax.train_step.train_step` trains on them unchanged: `targets` is -100 except where the next token is an
assistant token (reply text and its end-of-text token). Conversations are packed whole (first fit, padded), each
its own segment, so attention never crosses conversations.

Records longer than `seq_len` follow `data.truncation`; a record that keeps no assistant token is dropped.
A record that cannot be used (bad JSON, unknown role, no assistant turn, ...) stops the run with a message naming
the file and line, or, with `data.bad_records=skip`, is dropped. Every drop and truncation is counted in the
iterator's `stats()` and in its checkpointed state, so the counts survive a resume exactly (a drop reaches
`stats()` with the next record kept, so with `num_epochs` set, drops after the last kept record go unreported).
Blank lines are not records.

The machinery here (`RecordSource`, `Truncation`, `CountStage`, `CountingIterator`) is shared with the DPO
pipeline in `ling_jax.dpo_data`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags as absl_flags
from grain.experimental import FirstFitPackIterDataset

from ling_jax.config import IGNORE_INDEX
from ling_jax.data import chat
from ling_jax.data import pipeline as data_lib
from ling_jax.data.packing import make_targets
from ling_jax.data.tokenizer import Tokenizer

__all__ = ["BadRecords", "DataCount", "Truncation", "default_post_training_data_config", "held_out_batches",
           "make_sft_eval_batches", "make_sft_iterator", "training_batches"]


class Truncation(enum.Enum):
    """What happens to a record longer than `seq_len` tokens (`data.truncation`)."""

    DROP = "drop"  # Drop it (counted as dropped_too_long).
    TRUNCATE_RIGHT = "truncate_right"  # Keep its first seq_len tokens (the end of the last reply is lost).
    TRUNCATE_LEFT = "truncate_left"  # Keep its last seq_len tokens (the start of the conversation is lost).


class BadRecords(enum.Enum):
    """What happens to a record that cannot be used (`data.bad_records`)."""

    ERROR = "error"  # Stop with a message naming the file, the line and the problem.
    SKIP = "skip"  # Drop it (counted as dropped_malformed).


class DataCount(enum.IntEnum):
    """The counters of `stats()`; the value indexes the `counts` feature."""

    DROPPED_MALFORMED = 0  # Unusable records dropped under bad_records=skip.
    DROPPED_TOO_LONG = 1  # Records longer than seq_len dropped under truncation=drop.
    DROPPED_NO_LOSS = 2  # Records that kept no assistant (response) token after truncation.
    TRUNCATED = 3  # Records shortened to seq_len and kept.


def default_post_training_data_config() -> ml_collections.ConfigDict:
    """The `data` section of the SFT and DPO recipes: `data.default_data_config()` plus the chat fields."""
    cfg = data_lib.default_data_config()
    cfg.kind = "jsonl"  # SFT / DPO read jsonl records (one JSON object per line)
    cfg.packing = "first_fit"  # SFT packs whole conversations (first fit, padded); DPO pads one pair per row
    cfg.add_eos = False  # unused: the chat template ends every reply with its end-of-text token
    cfg.chat = chat.default_chat_config()  # the chat template's strings
    cfg.truncation = Truncation.DROP.value  # Truncation: drop | truncate_right | truncate_left (records > seq_len)
    cfg.bad_records = BadRecords.ERROR.value  # BadRecords: error (stop, naming file and line) | skip (count)
    return cfg


def option(cls: type[enum.Enum], data_cfg: ml_collections.ConfigDict, name: str, default: str) -> Any:
    """The enum member `data_cfg.<name>` names (clear error for an unknown value)."""
    value = data_cfg.get(name, default)
    try:
        return value if isinstance(value, cls) else cls(value)
    except ValueError:
        raise ValueError(f"data.{name}={value!r}; expected one of {[m.value for m in cls]}") from None


class RecordSource(data_lib.JsonlLines, data_lib.Source):
    """The lines of jsonl files: `document(i)` is `(where, parsed object or None, error or None)`."""

    def __init__(self, data_cfg: ml_collections.ConfigDict):
        kind = option(data_lib.SourceKind, data_cfg, "kind", "jsonl")
        if kind is not data_lib.SourceKind.JSONL:
            raise ValueError(f"post-training reads jsonl records, but data.kind={kind.value}; set data.kind=jsonl")
        files, self.where = data_lib._files(kind, data_cfg.path, "*.jsonl")
        super().__init__(files)
        if len(self) == 0:
            raise ValueError(f"{self.where} holds no records; point data.path at non-empty jsonl data")

    def document(self, index: int) -> tuple[str, Any, str | None]:
        f, row, line = self.line(index)
        where = f"{self.files[f]} line {row + 1}"
        if not line.strip():
            return where, None, None
        try:
            return where, json.loads(line.decode("utf-8")), None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return where, None, f"{where}: not a JSON object ({e})"


def truncate(ids: np.ndarray, mask: np.ndarray, seq_len: int, policy: Truncation, cut: int | None = None,
             ) -> tuple[np.ndarray, np.ndarray, DataCount | None]:
    """Fits a record into `seq_len` tokens.

    Args:
      ids: Token ids `[n]`.
      mask: Loss mask `[n]` (true on the assistant / response tokens).
      seq_len: The row length.
      policy: The truncation policy.
      cut: TRUNCATE_LEFT only: drop exactly this many leading tokens (default `n - seq_len`); DPO cuts
        the same prompt prefix from both responses.

    Returns:
      `(ids, mask, count)`: the kept tokens and what happened (None: untouched; TRUNCATED; or a
      DROPPED_* reason, with empty arrays). A kept record has a loss token after its first token.
    """
    n = len(ids)
    if n <= seq_len:
        count = None
    elif policy is Truncation.DROP:
        return ids[:0], mask[:0], DataCount.DROPPED_TOO_LONG
    else:
        start = (n - seq_len if cut is None else cut) if policy is Truncation.TRUNCATE_LEFT else 0
        ids, mask, count = ids[start : start + seq_len], mask[start : start + seq_len], DataCount.TRUNCATED
    if not mask[1:].any():
        return ids[:0], mask[:0], DataCount.DROPPED_NO_LOSS
    return ids, mask, count


@dataclasses.dataclass(frozen=True)
class Encoder:
    """What turns a record into tokens: the tokenizer, the template and the policies."""

    tokenizer: Tokenizer
    template: chat.ChatTemplate
    seq_len: int
    truncation: Truncation
    bad_records: BadRecords
    add_bos: bool

    @classmethod
    def from_config(cls, data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None, seq_len: int) -> Encoder:
        if tokenizer is None:
            raise ValueError("post-training data needs a tokenizer: set data.tokenizer")
        template = chat.ChatTemplate.from_config(data_cfg.get("chat", chat.default_chat_config()))
        template.check_tokenizer(tokenizer)
        return cls(tokenizer, template, seq_len, option(Truncation, data_cfg, "truncation", "drop"),
                   option(BadRecords, data_cfg, "bad_records", "error"), bool(data_cfg.get("add_bos", False)))

    def bad(self, message: str) -> dict[str, Any]:
        """The element of an unusable record (or the error, under BadRecords.ERROR)."""
        if self.bad_records is BadRecords.ERROR:
            raise chat.ChatFormatError(f"{message}. Fix the record, or set data.bad_records=skip to drop and "
                                       "count such records")
        return {"skip": int(DataCount.DROPPED_MALFORMED)}


class _SftExample:
    """`(epoch, index, record)` -> `{"inputs", "loss_mask", "counts" [K]}` or `{"skip": DataCount | -1}`."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, item: tuple[int, int, tuple[str, Any, str | None]]) -> dict[str, Any]:
        _, _, (where, record, error) = item
        enc = self.encoder
        if error is not None:
            return enc.bad(error)
        if record is None:
            return {"skip": -1}  # A blank line.
        try:
            messages = chat.conversation_from_record(record, where)
        except chat.ChatFormatError as e:
            return enc.bad(str(e))
        ids, mask = enc.template.encode(enc.tokenizer, messages, add_bos=enc.add_bos)
        ids, mask, count = truncate(ids, mask, enc.seq_len, enc.truncation)
        counts = np.zeros(len(DataCount), np.int32)
        if count is not None:
            if count is not DataCount.TRUNCATED:
                return {"skip": int(count)}
            counts[count] += 1
        return {"inputs": ids, "loss_mask": mask.astype(np.int32), "counts": counts}


class CountStage(grain.IterDataset):
    """Drops `{"skip": c}` elements, adding their counts (c >= 0) to the `counts` of the next kept element."""

    def __init__(self, parent: grain.IterDataset, *, max_consecutive_skips: int, where: str):
        super().__init__(parent)
        self._max, self._where = max_consecutive_skips, where

    def __iter__(self) -> _CountIterator:
        return _CountIterator(self._parent.__iter__(), self._max, self._where)


class _CountIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, max_consecutive_skips: int, where: str):
        super().__init__(parent)
        self._max, self._where = max_consecutive_skips, where
        self._pending, self._run = [0] * len(DataCount), 0

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            element = next(self._parent)
            if "skip" not in element:
                break
            if element["skip"] >= 0:
                self._pending[element["skip"]] += 1
            self._run += 1
            if self._run >= self._max:
                raise ValueError(f"no usable record in {self._where}: the last {self._run} records were all "
                                 f"dropped (counts {self._named()}); check the data and data.truncation")
        out = dict(element)
        out["counts"] = element["counts"] + np.asarray(self._pending, np.int32)
        self._pending, self._run = [0] * len(DataCount), 0
        return out

    def _named(self) -> dict[str, int]:
        return {c.name.lower(): self._pending[c] for c in DataCount}

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "pending": list(self._pending), "run": self._run}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._run = [int(c) for c in state["pending"]], int(state["run"])


class CountingIterator(grain.DatasetIterator):
    """The last stage: pops the `counts` of each batch and keeps running totals (`stats()`, checkpointed)."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._totals = [0] * len(DataCount)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        counts = batch.pop("counts")
        for c, n in enumerate(counts.reshape(-1, len(DataCount)).sum(axis=0)):
            self._totals[c] += int(n)
        return batch

    def stats(self) -> dict[str, int]:
        """Records dropped or truncated so far: `{"dropped_malformed": n, ..., "truncated": n}`."""
        return {c.name.lower(): self._totals[c] for c in DataCount}

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "counts": self.stats()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._totals = [int(state["counts"][c.name.lower()]) for c in DataCount]


class _Counting(grain.IterDataset):
    def __iter__(self) -> CountingIterator:
        return CountingIterator(self._parent.__iter__())


def build_pipeline(data_cfg: ml_collections.ConfigDict, source: RecordSource, indices: np.ndarray, example: Any, *,
                   batch: Any, seed: int, num_epochs: int | None, workers: int, what: str) -> CountingIterator:
    """Shuffled, repeated records -> `example` (a picklable map) -> counts -> `batch(dataset)` -> totals."""
    if len(indices) == 0:
        raise ValueError(f"no {what} records in {source.where} ({len(source)} in all); use more data, fewer "
                         "processes, or change data.eval_fraction")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    shard = data_lib._Shard(source, indices, seed=seed, shuffle=bool(data_cfg.get("shuffle", True)),
                            num_epochs=num_epochs)
    ds = grain.MapDataset.source(shard).map(example).to_iter_dataset(data_lib._READ_OPTIONS)
    ds = batch(CountStage(ds, max_consecutive_skips=max(2 * len(indices) * max(1, workers), 1000),
                          where=source.where))
    if workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags (defaults are fine).
            absl_flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(_Counting(ds))


def _finalize_sft(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Packed rows -> the training batch (targets only where the next token is an assistant token)."""
    segment_ids = batch["inputs_segment_ids"].astype(np.int32)
    inputs = np.where(segment_ids > 0, batch["inputs"], pad_id).astype(np.int32)
    targets = make_targets(inputs, segment_ids)
    targets[..., :-1] = np.where(batch["loss_mask"][..., 1:] > 0, targets[..., :-1], IGNORE_INDEX)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": np.where(segment_ids > 0, batch["inputs_positions"], 0).astype(np.int32),
            "counts": batch["counts"]}


def _spread_counts(element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Counts `[K]` -> `[n, K]` (at row 0) so that they travel through packing with the tokens."""
    counts = np.zeros((len(element["inputs"]), len(DataCount)), np.int32)
    counts[0] = element["counts"]
    return {**element, "counts": counts}


def _pack(ds: grain.IterDataset, *, seq_len: int, batch_size: int, pad_id: int) -> grain.IterDataset:
    lengths = {"inputs": seq_len, "loss_mask": seq_len, "counts": seq_len}
    ds = FirstFitPackIterDataset(ds.map(_spread_counts), length_struct=lengths,
                                 num_packing_bins=max(batch_size, 16), shuffle_bins=False)
    return ds.batch(batch_size, drop_remainder=True).map(functools.partial(_finalize_sft, pad_id=pad_id))


def _sft_pipeline(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer | None, seq_len: int,
                  batch_size: int, seed: int, train: bool, shard: tuple[int, int], num_epochs: int | None,
                  workers: int) -> CountingIterator:
    packing = option(data_lib.PackingKind, data_cfg, "packing", "first_fit")
    if packing is not data_lib.PackingKind.FIRST_FIT:
        raise ValueError(f"SFT packs whole conversations, so data.packing={packing.value} is not supported; "
                         "set data.packing=first_fit")
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"need seq_len >= 2 and batch_size >= 1; got {seq_len}, {batch_size}")
    encoder = Encoder.from_config(data_cfg, tokenizer, seq_len)
    source = RecordSource(data_cfg)
    eval_fraction = float(data_cfg.get("eval_fraction", 0.0))
    indices = data_lib.document_indices(len(source), eval_fraction, train=train, shard=shard)
    pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
    return build_pipeline(data_cfg, source, indices, _SftExample(encoder), seed=seed, num_epochs=num_epochs,
                          workers=workers, what="training" if train else "held-out",
                          batch=functools.partial(_pack, seq_len=seq_len, batch_size=batch_size, pad_id=pad_id))


def training_batches(pipeline: Callable[..., CountingIterator], data_cfg: ml_collections.ConfigDict, *,
                     tokenizer: Tokenizer | None, seq_len: int, batch_size: int, seed: int, process_index: int = 0,
                     process_count: int = 1) -> CountingIterator:
    """The training batches of one process, with `get_state` / `set_state` / `stats`.

    Args:
      pipeline: `_sft_pipeline` (packed conversations) or `ling_jax.dpo_data`'s (preference pairs).
      data_cfg: `default_post_training_data_config()`.
      tokenizer: The tokenizer; the chat template's end-of-text string must be one of its tokens.
      seq_len: Tokens per row.
      batch_size: Rows (SFT) or pairs (DPO) per batch of this process.
      seed: Shuffle seed.
      process_index: This process.
      process_count: Number of processes (each reads a disjoint shard of the records).

    Raises:
      ValueError: a bad config, no records, a tokenizer without the template's end-of-text token;
        `ChatFormatError` (a ValueError) on the first unusable record under `bad_records=error`.
    """
    return pipeline(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                    train=True, shard=(process_index, process_count), num_epochs=data_cfg.get("num_epochs"),
                    workers=int(data_cfg.get("worker_count", 0)))


def held_out_batches(pipeline: Callable[..., CountingIterator], data_cfg: ml_collections.ConfigDict, *,
                     tokenizer: Tokenizer | None, seq_len: int, batch_size: int, num_batches: int, seed: int,
                     ) -> list[dict[str, np.ndarray]]:
    """A fixed list of batches of the held-out records (`data.eval_fraction` > 0); args as `training_batches`."""
    if not 0.0 < float(data_cfg.get("eval_fraction", 0.0)) < 1.0:
        raise ValueError("evaluation needs data.eval_fraction in (0, 1); set it or set eval_every=0")
    it = pipeline(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  train=False, shard=(0, 1), num_epochs=None, workers=0)
    return [next(it) for _ in range(num_batches)]


make_sft_iterator = functools.partial(training_batches, _sft_pipeline)  # SFT training batches of one process.
make_sft_eval_batches = functools.partial(held_out_batches, _sft_pipeline)  # Held-out SFT batches.
