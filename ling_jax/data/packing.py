"""Packing of tokenized documents into fixed-length rows, on top of Grain's packers.

The pipelines hand this module a Grain `IterDataset` of kept documents, each a dict of per-token
features (`inputs`, int32 token ids, and for SFT `loss_mask`) and `counts` `[len(Count)]` (what was
dropped before it; see `ling_jax.data.counting`). `pack_and_batch` then:

1. For first-fit packing, splits documents longer than `seq_len` (`SplitStage`) into windows of
   `seq_len` tokens that overlap by one token, so every token but the first still gets a next-token
   target; the counts go with the first window.
2. Spreads the `counts` to `[n, len(Count)]` (at row 0) so that they travel through packing with the
   tokens they precede.
3. Packs with Grain: `PackingKind.CONCAT_SPLIT` (`ConcatThenSplitIterDataset`, no padding; a document
   that crosses a row boundary continues in the next row as a new segment starting at position 0) or
   `PackingKind.FIRST_FIT` (`FirstFitPackIterDataset`, documents stay whole, rows are padded).
4. Optionally shuffles the rows within windows of `shuffle_window` rows (Grain's
   `WindowShuffleIterDataset`, seeded and checkpointable), so that a batch mixes many documents
   instead of the consecutive rows of one long one.
5. Batches the rows and `finalize` builds the batch dict: `inputs`, `targets` (`inputs[t + 1]` within
   the same segment, and for SFT only where that next token is a loss token; -100 at each segment's
   last token and on padding), `segment_ids` (1, 2, ... per row, 0 on padding), `positions`
   (restarting at 0 per segment), and the batch's `counts` `[len(Count)]`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset, WindowShuffleIterDataset

from ling_jax.config import IGNORE_INDEX
from ling_jax.data.counting import Count, tally
from ling_jax.data.settings import PackingKind

__all__ = ["PackingKind", "SplitStage", "finalize", "make_targets", "pack_and_batch", "spread_counts"]


class SplitStage(grain.IterDataset):
    """Splits documents longer than `max_len` into windows of `max_len` tokens overlapping by one."""

    def __init__(self, parent: grain.IterDataset, *, max_len: int, features: Sequence[str]):
        """Wraps `parent` (kept documents: the per-token `features` and `counts`)."""
        super().__init__(parent)
        self._max_len, self._features = max_len, tuple(features)

    def __iter__(self) -> _SplitIterator:
        return _SplitIterator(self._parent.__iter__(), self._max_len, self._features)


class _SplitIterator(grain.DatasetIterator):
    """State: the parent state before the document being split (or the current one) and the next window."""

    def __init__(self, parent: grain.DatasetIterator, max_len: int, features: tuple[str, ...]):
        super().__init__(parent)
        self._max_len, self._features = max_len, features
        self._doc: dict[str, Any] | None = None  # The document being split into windows.
        self._doc_parent_state: dict[str, Any] | None = None
        self._window = 0

    def _pull(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc_parent_state = self._parent.get_state()
            self._doc, self._window = next(self._parent), 0
        return self._doc

    def __next__(self) -> dict[str, Any]:
        doc = self._pull()
        n = len(doc[self._features[0]])
        if n <= self._max_len:
            self._doc = self._doc_parent_state = None
            return doc
        start = self._window * (self._max_len - 1)  # Windows overlap by one token.
        piece = {k: doc[k][start : start + self._max_len] for k in self._features}
        piece["counts"] = doc["counts"] if self._window == 0 else tally()
        self._window += 1
        if start + self._max_len >= n:
            self._doc = self._doc_parent_state = None
        return piece

    def get_state(self) -> dict[str, Any]:
        splitting = self._doc is not None
        return {"parent": self._doc_parent_state if splitting else self._parent.get_state(),
                "window": self._window if splitting else 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc = self._doc_parent_state = None
        if state["window"]:
            self._pull()  # The document being split comes first.
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
    """The training batch of packed rows (see the module docstring).

    Args:
      batch: Grain's packed rows: `inputs`, `inputs_segment_ids`, `inputs_positions`, `counts`
        `[B, T, len(Count)]` and, for SFT, `loss_mask` (targets only where the next token has it).
      pad_id: Token id written on padding.
    """
    segment_ids = batch["inputs_segment_ids"].astype(np.int32)  # [B, T]
    inputs = np.where(segment_ids > 0, batch["inputs"], pad_id).astype(np.int32)  # [B, T]
    targets = make_targets(inputs, segment_ids)  # [B, T]
    if "loss_mask" in batch:  # SFT: the loss is on the assistant tokens only.
        targets[..., :-1] = np.where(batch["loss_mask"][..., 1:] > 0, targets[..., :-1], IGNORE_INDEX)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": np.where(segment_ids > 0, batch["inputs_positions"], 0).astype(np.int32),
        "counts": batch["counts"].reshape(-1, len(Count)).sum(axis=0, dtype=np.int64),
    }


def spread_counts(element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`counts` `[len(Count)]` -> `[n, len(Count)]` (at row 0), a per-token feature that packing carries along."""
    counts = np.zeros((len(element["inputs"]), len(Count)), np.int32)
    counts[0] = element["counts"]
    return {**element, "counts": counts}


def pack_and_batch(documents: grain.IterDataset, *, kind: PackingKind, seq_len: int, batch_size: int, pad_id: int,
                   features: Sequence[str] = ("inputs",), shuffle_window: int = 0, seed: int = 0) -> grain.IterDataset:
    """Packs kept documents into batches of rows (steps 1-5 of the module docstring).

    Args:
      documents: Dicts of the per-token `features` (`inputs` first) and `counts` `[len(Count)]`.
      kind: The packing algorithm.
      seq_len: Tokens per row.
      batch_size: Rows per batch; an incomplete last batch of a finite dataset is dropped.
      pad_id: Token id written on padding.
      features: The per-token features: `("inputs",)`, or `("inputs", "loss_mask")` for SFT.
      shuffle_window: Rows shuffled together before batching (0 or 1: rows stay in order).
      seed: Seed of that shuffle (each window gets its own, derived from it).
    """
    ds = documents
    if kind is PackingKind.FIRST_FIT:
        ds = SplitStage(ds, max_len=seq_len, features=features)
    ds = ds.map(spread_counts)
    lengths = {k: seq_len for k in (*features, "counts")}
    if kind is PackingKind.CONCAT_SPLIT:
        ds = ConcatThenSplitIterDataset(ds, length_struct=lengths)
    else:
        bins = max(batch_size, 16)
        ds = FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=bins, shuffle_bins=False)
    if shuffle_window > 1:
        ds = WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
    ds = ds.batch(batch_size, drop_remainder=True)
    return ds.map(functools.partial(finalize, pad_id=pad_id))
