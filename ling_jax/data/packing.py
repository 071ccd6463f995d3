"""Packing of tokenized documents into fixed-length rows, on top of Grain's packers.

The pipeline in `ling_jax.data` hands this module a Grain `IterDataset` of
per-document elements, each either `{"inputs": int32 token ids}` or
`{"skip": SkipReason}` for a document that could not be used. From them:

1. `DocumentStage` drops the skipped documents, carrying their counts to the
   next kept one (as a `"skips"` feature `[n, len(SkipReason)]` with the counts
   at row 0), so that the counts travel through packing, batching and Grain's
   worker processes with the tokens they precede and survive a resume exactly.
   For first-fit packing it also splits documents longer than `seq_len` into
   windows of `seq_len` tokens that overlap by one token, so every token but
   the first still gets a next-token target.
2. Grain packs: `PackingKind.CONCAT_SPLIT` (`ConcatThenSplitIterDataset`, no
   padding; a document that crosses a row boundary continues in the next row
   as a new segment starting at position 0) or `PackingKind.FIRST_FIT`
   (`FirstFitPackIterDataset`, documents stay whole, rows are padded).
3. Rows are batched and `finalize` builds the batch dict: `inputs`, `targets`
   (`inputs[t + 1]` within the same segment, -100 at each segment's last token
   and on padding), `segment_ids` (1, 2, ... per row, 0 on padding),
   `positions` (restarting at 0 per segment), and the `skips` counts.
4. `StatsStage`, the last stage (after Grain's worker processes), pops the
   `skips` counts, keeps running totals in its own (checkpointed) state and
   exposes them as `stats()`.

The iterator's state is JSON-serializable; `StatsStage.set_state` also repairs
the one state Grain 0.2.18 does not restore from JSON (the tuples of
`ConcatThenSplitIterDataset`'s `remainder_slices`, which JSON turns into lists).
"""

from __future__ import annotations

import enum
import functools
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset

from ling_jax.config import IGNORE_INDEX


class SkipReason(enum.IntEnum):
    """Why a document was left out; the value indexes the `skips` counts."""

    UNDECODABLE = 0  # Bytes that are not valid UTF-8.
    MALFORMED = 1  # A bad JSON line, a missing / non-text field, a null value, an unreadable file.
    EMPTY = 2  # No text, or fewer than 2 tokens (no next-token target at all).


class PackingKind(enum.Enum):
    """How documents are packed into rows of `seq_len` tokens."""

    CONCAT_SPLIT = "concat_split"  # Concatenate and cut at seq_len: no padding; long documents continue in later rows.
    FIRST_FIT = "first_fit"  # First-fit bin packing: documents stay whole (split only if > seq_len); rows are padded.


def _zero_counts() -> list[int]:
    return [0] * len(SkipReason)


class DocumentStage(grain.IterDataset):
    """Drops skipped documents (counting them into the next kept one) and splits long documents."""

    def __init__(self, parent: grain.IterDataset, *, max_len: int | None, max_consecutive_skips: int, where: str):
        """Wraps `parent`.

        Args:
          parent: Elements `{"inputs": int32 ids}` or `{"skip": SkipReason}`.
          max_len: Split documents longer than this into windows of `max_len` tokens overlapping by one
            (None: never split).
          max_consecutive_skips: Raise once this many documents in a row were skipped (no usable data).
          where: The dataset, for that error message.
        """
        super().__init__(parent)
        self._max_len = max_len
        self._max_consecutive_skips = max_consecutive_skips
        self._where = where

    def __iter__(self) -> _DocumentIterator:
        return _DocumentIterator(
            self._parent.__iter__(),
            max_len=self._max_len,
            max_consecutive_skips=self._max_consecutive_skips,
            where=self._where,
        )


class _DocumentIterator(grain.DatasetIterator):
    """State: the parent state before the document being split (or the current one), the next window,
    the skip counts not yet emitted and the current run of skips."""

    def __init__(self, parent: grain.DatasetIterator, *, max_len: int | None, max_consecutive_skips: int, where: str):
        super().__init__(parent)
        self._max_len = max_len
        self._max_consecutive_skips = max_consecutive_skips
        self._where = where
        self._doc: np.ndarray | None = None  # The document being split into windows.
        self._doc_parent_state: dict[str, Any] | None = None
        self._window = 0
        self._pending = _zero_counts()
        self._run = 0

    def _pull(self) -> None:
        """Reads parent elements until a kept document; counts the skipped ones."""
        while self._doc is None:
            state = self._parent.get_state()
            element = next(self._parent)
            if "skip" in element:
                self._pending[int(element["skip"])] += 1
                self._run += 1
                if self._run >= self._max_consecutive_skips:
                    counts = {r.name.lower(): self._pending[r] for r in SkipReason}
                    msg = (
                        f"no usable document in {self._where}: the last {self._run} documents were all skipped "
                        f"(counts so far {counts}); check that the files hold UTF-8 text and that text_field is right"
                    )
                    raise ValueError(msg)
                continue
            self._doc, self._doc_parent_state, self._window, self._run = element["inputs"], state, 0, 0

    def __next__(self) -> dict[str, np.ndarray]:
        self._pull()
        doc = self._doc
        assert doc is not None
        if self._max_len is None or len(doc) <= self._max_len:
            piece, last = doc, True
        else:
            start = self._window * (self._max_len - 1)  # Windows overlap by one token.
            piece = doc[start : start + self._max_len]
            last = start + self._max_len >= len(doc)
        skips = np.zeros((len(piece), len(SkipReason)), np.int32)
        skips[0] = self._pending
        self._pending = _zero_counts()
        self._window += 1
        if last:
            self._doc = self._doc_parent_state = None
        return {"inputs": piece, "skips": skips}

    def get_state(self) -> dict[str, Any]:
        splitting = self._doc is not None
        return {
            "parent": self._doc_parent_state if splitting else self._parent.get_state(),
            "window": self._window if splitting else 0,
            "pending": list(self._pending),
            "run": self._run,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = self._doc_parent_state = None
        self._pending, self._run = [int(c) for c in state["pending"]], int(state["run"])
        if state["window"]:
            self._pull()  # The document being split; it was kept, so it comes first.
            self._window = int(state["window"])


def make_targets(inputs: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Next-token labels of packed rows: `inputs[..., t + 1]` within a segment, else `IGNORE_INDEX`.

    Args:
      inputs: Token ids `[..., seq_len]`.
      segment_ids: Segment of each token `[..., seq_len]`, 0 on padding.
    """
    targets = np.full(inputs.shape, IGNORE_INDEX, np.int32)
    same = (segment_ids[..., 1:] == segment_ids[..., :-1]) & (segment_ids[..., :-1] > 0)
    targets[..., :-1] = np.where(same, inputs[..., 1:], IGNORE_INDEX)
    return targets


def finalize(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """The training batch of packed rows (see the module docstring), with the `skips` counts `[len(SkipReason)]`."""
    segment_ids = batch["inputs_segment_ids"].astype(np.int32)
    inputs = np.where(segment_ids > 0, batch["inputs"], pad_id).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": make_targets(inputs, segment_ids),
        "segment_ids": segment_ids,
        "positions": np.where(segment_ids > 0, batch["inputs_positions"], 0).astype(np.int32),
        "skips": batch["skips"].sum(axis=tuple(range(batch["skips"].ndim - 1)), dtype=np.int64),
    }


def pack_and_batch(
    documents: grain.IterDataset,
    *,
    kind: PackingKind,
    seq_len: int,
    batch_size: int,
    pad_id: int,
    max_consecutive_skips: int,
    where: str,
) -> grain.IterDataset:
    """Packs per-document elements into batches of rows (steps 1-3 of the module docstring).

    Args:
      documents: Elements `{"inputs": int32 ids}` or `{"skip": SkipReason}`.
      kind: The packing algorithm.
      seq_len: Tokens per row.
      batch_size: Rows per batch; an incomplete last batch of a finite dataset is dropped.
      pad_id: Token id written on padding.
      max_consecutive_skips: See `DocumentStage`.
      where: The dataset, for error messages.
    """
    max_len = seq_len if kind is PackingKind.FIRST_FIT else None
    ds = DocumentStage(documents, max_len=max_len, max_consecutive_skips=max_consecutive_skips, where=where)
    lengths = {"inputs": seq_len, "skips": seq_len}
    if kind is PackingKind.CONCAT_SPLIT:
        ds = ConcatThenSplitIterDataset(ds, length_struct=lengths)
    else:
        bins = max(batch_size, 16)
        ds = FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=bins, shuffle_bins=False)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.map(functools.partial(finalize, pad_id=pad_id))


def _restore_tuples(state: Any) -> Any:
    """Turns the `remainder_slices` pairs of concat-then-split states back into tuples (JSON makes lists)."""
    if isinstance(state, dict):
        return {
            k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _restore_tuples(v))
            for k, v in state.items()
        }
    if isinstance(state, list):
        return [_restore_tuples(v) for v in state]
    return state


class StatsStage(grain.IterDataset):
    """The last stage: removes the `skips` counts from batches and totals them in `stats()`."""

    def __iter__(self) -> StatsIterator:
        return StatsIterator(self._parent.__iter__())


class StatsIterator(grain.DatasetIterator):
    """Iterator over training batches (dicts of `[batch_size, seq_len]` int32 arrays).

    `get_state()` / `set_state()` give exact resume (the state is a JSON-serializable
    dict, so Grain's Orbax `CheckpointHandler` works with it); `stats()` tells how many
    documents were skipped, by reason, in the data yielded so far.
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._skipped = _zero_counts()

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        for reason, count in enumerate(batch.pop("skips")):
            self._skipped[reason] += int(count)
        return batch

    def stats(self) -> dict[str, int]:
        """Documents skipped so far, by reason: `{"undecodable": n, "malformed": n, "empty": n}`."""
        return {reason.name.lower(): self._skipped[reason] for reason in SkipReason}

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "skipped": self.stats()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_restore_tuples(state["pipeline"]))
        self._skipped = [int(state["skipped"][reason.name.lower()]) for reason in SkipReason]
