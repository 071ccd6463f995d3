"""Counting (ling_jax.data.counting): drops carried to the next kept record, totals, exact resume, no usable data."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from ling_jax.config import UserError
from ling_jax.data.counting import Count, CountedStage, CountStage, DataError, dropped, tally

KEYS = ["dropped_undecodable", "dropped_malformed", "dropped_empty", "dropped_too_long", "dropped_no_loss",
        "truncated"]


def _elements() -> list[dict]:
    """Kept records 1..4 with drops between them (one blank line, which is not counted)."""
    return [
        dropped(Count.DROPPED_EMPTY), dropped(Count.DROPPED_EMPTY), {"inputs": np.array([1])},
        {"inputs": np.array([2]), "counts": tally(Count.TRUNCATED)},
        dropped(None), dropped(Count.DROPPED_MALFORMED), {"inputs": np.array([3])},
        dropped(Count.DROPPED_UNDECODABLE), {"inputs": np.array([4]), "counts": tally(Count.TRUNCATED)},
    ]


def _counted(elements: list[dict], max_drops: int = 100) -> grain.IterDataset:
    return CountStage(grain.MapDataset.source(elements).to_iter_dataset(), max_consecutive_drops=max_drops,
                      where="test data", fix="check the test")


def test_key_names():
    assert [c.key for c in Count] == KEYS


def test_tally():
    assert tally().tolist() == [0] * 6
    assert tally(Count.TRUNCATED, None, Count.DROPPED_EMPTY, Count.TRUNCATED).tolist() == [0, 0, 1, 0, 0, 2]
    assert tally().dtype == np.int32


def test_drops_are_carried_to_the_next_kept_record():
    kept = list(_counted(_elements()))
    assert [int(k["inputs"][0]) for k in kept] == [1, 2, 3, 4]
    assert [k["counts"].tolist() for k in kept] == [[0, 0, 2, 0, 0, 0], [0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 0, 0],
                                                    [1, 0, 0, 0, 0, 1]]


def test_stats_total_the_batches_and_resume_exactly():
    batched = CountedStage(_counted(_elements()).batch(1))
    it = iter(batched)
    first = next(it)
    assert "counts" not in first and first["inputs"].tolist() == [[1]]
    assert it.stats() == dict(zip(KEYS, [0, 0, 2, 0, 0, 0], strict=True))
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["counts"] == dict(zip(KEYS, [0, 0, 2, 0, 0, 1], strict=True))
    rest = [b["inputs"].tolist() for b in it]
    assert rest == [[[3]], [[4]]] and it.stats() == dict(zip(KEYS, [1, 1, 2, 0, 0, 2], strict=True))
    resumed = iter(batched)
    resumed.set_state(state)
    assert [b["inputs"].tolist() for b in resumed] == rest
    assert resumed.stats() == it.stats()


def test_pending_drops_survive_a_resume():
    stage = _counted(_elements())
    it = iter(stage)
    next(it), next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(stage)
    resumed.set_state(state)
    assert next(resumed)["counts"].tolist() == [0, 1, 0, 0, 0, 0]  # The malformed record before record 3.


def test_a_long_run_of_drops_is_a_clear_error():
    elements = [{"inputs": np.array([1])}] + [dropped(Count.DROPPED_TOO_LONG)] * 5 + [{"inputs": np.array([2])}]
    it = iter(_counted(elements, max_drops=5))
    assert next(it)["counts"].tolist() == [0] * 6
    with pytest.raises(DataError, match=r"no usable record in test data: the last 5 were all dropped \(counts so "
                                        r"far \{.*'dropped_too_long': 5.*\}\); check the test"):
        next(it)
    assert issubclass(DataError, UserError)
