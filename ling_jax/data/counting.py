"""One way of counting what the data pipelines drop, and why, or truncate: pre-training, SFT and DPO alike.

A pipeline's per-record map returns, for a record it cannot use, `dropped(Count.X)` (or `dropped(None)`
for something that is not a record at all, such as a blank jsonl line), and for a record it keeps its
features, optionally with `counts` (`tally(Count.TRUNCATED)`). Then:

1. `CountStage` drops the dropped records and adds their counts to the `counts` `[len(Count)]` of the next
   kept record, so that the counts travel with the tokens they precede, through packing, batching and
   Grain's worker processes, and survive a resume exactly. It raises `DataError` after a long run of
   dropped records (the data holds nothing usable).
2. The pipeline packs / batches, summing or stacking the `counts` along.
3. `CountedStage`, the last stage (after Grain's worker processes), pops the `counts` of every batch, keeps
   running totals in its (checkpointed, JSON-serializable) state and exposes them as `stats()`:
   `{"dropped_undecodable": n, "dropped_malformed": n, "dropped_empty": n, "dropped_too_long": n,
   "dropped_no_loss": n, "truncated": n}` for every pipeline.

A count reaches `stats()` with the next kept record, so with `num_epochs` set, drops after the last kept
record go unreported.
"""

from __future__ import annotations

import enum
from typing import Any

import grain
import numpy as np

from ling_jax.config import UserError

__all__ = ["Count", "CountStage", "CountedIterator", "CountedStage", "DataError", "dropped", "tally"]

_DROPPED = "dropped"  # The feature of a dropped record: its `Count`, or None (not counted).


class DataError(UserError):
    """The data cannot be used: no files, no records, or nothing usable in them; the message names the data."""


class Count(enum.IntEnum):
    """What is counted; the value indexes the `counts` feature."""

    DROPPED_UNDECODABLE = 0  # Bytes that are not valid UTF-8 (pre-training).
    DROPPED_MALFORMED = 1  # A bad JSON line, a missing / non-text field, an unreadable file; a bad SFT / DPO record
    #                        under bad_records=skip.
    DROPPED_EMPTY = 2  # No text, or fewer than 2 tokens: no next-token target at all (pre-training).
    DROPPED_TOO_LONG = 3  # An SFT / DPO record longer than seq_len under truncation=drop.
    DROPPED_NO_LOSS = 4  # An SFT / DPO record that kept no assistant (response) token after truncation.
    TRUNCATED = 5  # An SFT / DPO record shortened to seq_len and kept.

    @property
    def key(self) -> str:
        """Its name in `stats()` and in the iterator state (`dropped_malformed`, ...)."""
        return self.name.lower()


def dropped(count: Count | None) -> dict[str, Any]:
    """The element of a record that is left out, counted as `count` (None: not counted, not a record)."""
    return {_DROPPED: count}


def tally(*counts: Count | None) -> np.ndarray:
    """The `counts` feature `[len(Count)]` (int32) with one for each of `counts` (None: nothing)."""
    out = np.zeros(len(Count), np.int32)
    for c in counts:
        if c is not None:
            out[c] += 1
    return out


def _named(counts: list[int]) -> dict[str, int]:
    return {c.key: int(counts[c]) for c in Count}


class CountStage(grain.IterDataset):
    """Drops the `dropped(...)` elements, adding their counts to the `counts` of the next kept element."""

    def __init__(self, parent: grain.IterDataset, *, max_consecutive_drops: int, where: str, fix: str):
        """Wraps `parent`.

        Args:
          parent: Kept elements (dicts of features, `counts` optional) and `dropped(...)` ones.
          max_consecutive_drops: Raise `DataError` once this many elements in a row were dropped.
          where: The dataset, for that message.
          fix: What to check, for that message.
        """
        super().__init__(parent)
        self._max, self._where, self._fix = max_consecutive_drops, where, fix

    def __iter__(self) -> _CountIterator:
        return _CountIterator(self._parent.__iter__(), self._max, self._where, self._fix)


class _CountIterator(grain.DatasetIterator):
    """State: the parent's, the counts not yet attached to a kept element and the current run of drops."""

    def __init__(self, parent: grain.DatasetIterator, max_consecutive_drops: int, where: str, fix: str):
        super().__init__(parent)
        self._max, self._where, self._fix = max_consecutive_drops, where, fix
        self._pending, self._run = [0] * len(Count), 0

    def __next__(self) -> dict[str, Any]:
        while True:
            element = next(self._parent)
            if _DROPPED not in element:
                break
            if element[_DROPPED] is not None:
                self._pending[element[_DROPPED]] += 1
            self._run += 1
            if self._run >= self._max:
                raise DataError(f"no usable record in {self._where}: the last {self._run} were all dropped "
                                f"(counts so far {_named(self._pending)}); {self._fix}")
        out = dict(element)
        out["counts"] = element.get("counts", tally()) + np.asarray(self._pending, np.int32)
        self._pending, self._run = [0] * len(Count), 0
        return out

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "pending": list(self._pending), "run": self._run}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._run = [int(c) for c in state["pending"]], int(state["run"])


def _restore_tuples(state: Any) -> Any:
    """Turns the `remainder_slices` pairs of Grain's concat-then-split states back into tuples.

    Grain 0.2.18 does not restore them from JSON (which makes lists of tuples); every other state
    round-trips, so the outermost stage repairs the whole pipeline's state.
    """
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _restore_tuples(v))
                for k, v in state.items()}
    if isinstance(state, list):
        return [_restore_tuples(v) for v in state]
    return state


class CountedStage(grain.IterDataset):
    """The last stage: pops the `counts` of each batch and totals them in `stats()`.

    `dataset` describes the data the positions refer to (the number of documents); it is saved in the
    state and a resume onto different data is refused.
    """

    def __init__(self, parent: grain.IterDataset, dataset: str = ""):
        super().__init__(parent)
        self.dataset = dataset

    def __iter__(self) -> CountedIterator:
        return CountedIterator(self._parent.__iter__(), self.dataset)


class CountedIterator(grain.DatasetIterator):
    """The iterator the `make_*_iterator` functions return: batches (dicts of int32 arrays) without `counts`.

    `get_state()` / `set_state()` give exact resume (the state is a JSON-serializable dict, so Grain's
    Orbax `CheckpointHandler` works with it); `stats()` tells what was dropped or truncated, by `Count`,
    in the data yielded so far.
    """

    def __init__(self, parent: grain.DatasetIterator, dataset: str = ""):
        super().__init__(parent)
        self._totals = [0] * len(Count)
        self.dataset = dataset

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        counts = batch.pop("counts")  # [..., len(Count)]
        for c, n in enumerate(counts.reshape(-1, len(Count)).sum(axis=0, dtype=np.int64)):
            self._totals[c] += int(n)
        return batch

    def stats(self) -> dict[str, int]:
        """What was dropped or truncated so far: `{Count.key: n}` for every `Count`."""
        return _named(self._totals)

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "counts": self.stats(), "dataset": self.dataset}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state()`; a state saved over other data (files added or removed) raises `DataError`."""
        saved = state.get("dataset")  # absent in states saved before it was recorded
        if saved is not None and saved != self.dataset:
            raise DataError(f"the data changed since the checkpoint was written: it was {saved}, it is "
                            f"{self.dataset}; restore the data to resume exactly, or start a new --workdir")
        self._parent.set_state(_restore_tuples(state["pipeline"]))
        self._totals = [int(state["counts"][c.key]) for c in Count]
