"""Packing (ling_jax.data.packing): next-token targets at segment boundaries, the batch dict, both packers with
real numbers, long-document windows, and the counts that travel with the tokens."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from ling_jax.data.counting import Count, tally
from ling_jax.data.packing import PackingKind, SplitStage, finalize, make_targets, pack_and_batch, spread_counts

PAD = 0


def _docs(*token_lists: list[int], counts: dict[int, list[Count]] | None = None) -> grain.IterDataset:
    """Kept documents `{"inputs", "counts"}`; `counts[i]` is what was dropped before document `i`."""
    counts = counts or {}
    elements = [{"inputs": np.array(t, np.int32), "counts": tally(*counts.get(i, []))}
                for i, t in enumerate(token_lists)]
    return grain.MapDataset.source(elements).to_iter_dataset()


def _lists(batch: dict[str, np.ndarray]) -> dict[str, list]:
    return {k: v.tolist() for k, v in batch.items()}


def test_make_targets_stop_at_every_segment_boundary_and_on_padding():
    inputs = np.array([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]], np.int32)
    segment_ids = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]], np.int32)
    np.testing.assert_array_equal(make_targets(inputs, segment_ids), [[11, -100, 13, 14, -100, -100],
                                                                      [-100, -100, 23, -100, -100, -100]])
    # A row that is one segment: every token but the last has a target.
    np.testing.assert_array_equal(make_targets(inputs[0], np.ones(6, np.int32)), [11, 12, 13, 14, 15, -100])


def _grain_rows(loss_mask: list[int] | None = None) -> dict[str, np.ndarray]:
    """One packed row as Grain gives it: two segments and one padding token (value 99, position 7)."""
    batch = {"inputs": np.array([[5, 6, 7, 8, 9, 99]]), "inputs_segment_ids": np.array([[1, 1, 1, 2, 2, 0]]),
             "inputs_positions": np.array([[0, 1, 2, 0, 1, 7]]),
             "counts": np.zeros((1, 6, len(Count)), np.int32)}
    batch["counts"][0, 0, Count.DROPPED_EMPTY] = 2
    batch["counts"][0, 3, Count.DROPPED_MALFORMED] = 1
    if loss_mask is not None:
        batch["loss_mask"] = np.array([loss_mask], np.int32)
    return batch


def test_finalize_builds_the_batch_dict():
    out = finalize(_grain_rows(), pad_id=3)
    assert sorted(out) == ["counts", "inputs", "positions", "segment_ids", "targets"]
    assert all(out[k].dtype == np.int32 for k in ("inputs", "positions", "segment_ids", "targets"))
    assert _lists(out) == {"inputs": [[5, 6, 7, 8, 9, 3]], "targets": [[6, 7, -100, 9, -100, -100]],
                           "segment_ids": [[1, 1, 1, 2, 2, 0]], "positions": [[0, 1, 2, 0, 1, 0]],
                           "counts": [0, 1, 2, 0, 0, 0]}


def test_finalize_with_a_loss_mask_keeps_targets_only_before_loss_tokens():
    out = finalize(_grain_rows(loss_mask=[0, 0, 1, 1, 1, 0]), pad_id=3)
    # t=0: the next token (6) has no loss; t=1 -> 7; t=2 ends segment 1; t=3 -> 9; t=4 ends segment 2.
    assert out["targets"].tolist() == [[-100, 7, -100, 9, -100, -100]]
    assert "loss_mask" not in out


def test_spread_counts_puts_them_on_the_first_token():
    out = spread_counts({"inputs": np.array([4, 5, 6], np.int32), "counts": tally(Count.TRUNCATED)})
    assert out["counts"].shape == (3, len(Count))
    assert out["counts"].tolist() == [[0, 0, 0, 0, 0, 1], [0] * 6, [0] * 6]


def test_concat_split_rows_segments_positions_targets_and_counts():
    docs = _docs([1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14],
                 counts={1: [Count.DROPPED_EMPTY, Count.DROPPED_EMPTY], 3: [Count.DROPPED_MALFORMED]})
    batches = [_lists(b) for b in pack_and_batch(docs, kind=PackingKind.CONCAT_SPLIT, seq_len=4, batch_size=2,
                                                  pad_id=PAD)]
    # Rows are cut every 4 tokens; a document that crosses a row boundary goes on as a new segment at 0.
    assert batches == [
        {"inputs": [[1, 2, 3, 4], [5, 6, 7, 8]], "targets": [[2, 3, -100, -100], [6, 7, 8, -100]],
         "segment_ids": [[1, 1, 1, 2], [1, 1, 1, 1]], "positions": [[0, 1, 2, 0], [0, 1, 2, 3]],
         "counts": [0, 0, 2, 0, 0, 0]},
        {"inputs": [[9, 10, 11, 12], [13, 14, PAD, PAD]], "targets": [[-100, 11, -100, -100], [14, -100, -100, -100]],
         "segment_ids": [[1, 2, 2, 3], [1, 1, 0, 0]], "positions": [[0, 0, 1, 0], [0, 1, 0, 0]],
         "counts": [0, 1, 0, 0, 0, 0]},
    ]


def test_first_fit_keeps_documents_whole_and_splits_long_ones_into_overlapping_windows():
    docs = _docs([1, 2, 3], [4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15],
                 counts={1: [Count.DROPPED_EMPTY, Count.DROPPED_UNDECODABLE]})
    batches = [_lists(b) for b in pack_and_batch(docs, kind=PackingKind.FIRST_FIT, seq_len=4, batch_size=2,
                                                  pad_id=PAD)]
    # [4..9] (6 > 4 tokens) becomes the windows [4, 5, 6, 7] and [7, 8, 9]: token 7 is in both, so 8 keeps
    # its input 7 and every token after the first has a target. The counts go with the first window only.
    assert batches == [
        {"inputs": [[1, 2, 3, PAD], [4, 5, 6, 7]], "targets": [[2, 3, -100, -100], [5, 6, 7, -100]],
         "segment_ids": [[1, 1, 1, 0], [1, 1, 1, 1]], "positions": [[0, 1, 2, 0], [0, 1, 2, 3]],
         "counts": [1, 0, 1, 0, 0, 0]},
        {"inputs": [[7, 8, 9, PAD], [10, 11, PAD, PAD]], "targets": [[8, 9, -100, -100], [11, -100, -100, -100]],
         "segment_ids": [[1, 1, 1, 0], [1, 1, 0, 0]], "positions": [[0, 1, 2, 0], [0, 1, 0, 0]],
         "counts": [0, 0, 0, 0, 0, 0]},
    ]


def test_first_fit_packs_several_documents_per_row():
    docs = _docs([1, 2], [3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13])
    (batch,) = pack_and_batch(docs, kind=PackingKind.FIRST_FIT, seq_len=5, batch_size=2, pad_id=PAD)
    # Rows: [1, 2 | 3, 4, 5], [6, 7 | 12, 13] (the second window of the last document fits into the first row
    # with room) and [8, 9, 10, 11, 12], which would start the next batch (dropped: the data ends).
    assert _lists(batch)["inputs"] == [[1, 2, 3, 4, 5], [6, 7, 12, 13, PAD]]
    assert batch["segment_ids"].tolist() == [[1, 1, 2, 2, 2], [1, 1, 2, 2, 0]]
    assert batch["positions"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 0]]
    assert batch["targets"].tolist() == [[2, -100, 4, 5, -100], [7, -100, 13, -100, -100]]


def test_loss_mask_travels_through_packing():
    elements = [{"inputs": np.array(t, np.int32), "loss_mask": np.array(m, np.int32), "counts": tally()}
                for t, m in (([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7], [0, 0, 1, 1]))]
    docs = grain.MapDataset.source(elements).to_iter_dataset()
    (batch,) = pack_and_batch(docs, kind=PackingKind.FIRST_FIT, seq_len=4, batch_size=2, pad_id=PAD,
                              features=("inputs", "loss_mask"))
    assert batch["targets"].tolist() == [[2, 3, -100, -100], [-100, 6, 7, -100]]


def test_split_stage_resumes_inside_a_document_without_counting_twice():
    elements = [{"inputs": np.arange(10, 20, dtype=np.int32), "counts": tally(Count.DROPPED_EMPTY)},
                {"inputs": np.array([1, 2], np.int32), "counts": tally(Count.DROPPED_MALFORMED)}]
    stage = SplitStage(grain.MapDataset.source(elements).to_iter_dataset(), max_len=4, features=("inputs",))
    it = iter(stage)
    first = next(it)
    assert first["inputs"].tolist() == [10, 11, 12, 13] and first["counts"][Count.DROPPED_EMPTY] == 1
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(3)]
    # Windows start every max_len - 1 = 3 tokens: 10.., 13.., 16.., then the next document.
    assert [r["inputs"].tolist() for r in rest] == [[13, 14, 15, 16], [16, 17, 18, 19], [1, 2]]
    assert [r["counts"].tolist() for r in rest] == [[0] * 6, [0] * 6, [0, 1, 0, 0, 0, 0]]
    resumed = iter(stage)
    resumed.set_state(state)
    again = [next(resumed) for _ in range(3)]
    for want, got in zip(rest, again, strict=True):
        assert want["inputs"].tolist() == got["inputs"].tolist() and want["counts"].tolist() == got["counts"].tolist()
    with pytest.raises(StopIteration):
        next(resumed)


def test_row_shuffle_permutes_rows_within_windows_and_keeps_the_counts():
    docs = [list(range(10 * i + 1, 10 * i + 9)) for i in range(8)]  # 8 documents of 8 tokens: 64 tokens, 16 rows
    kwargs = dict(kind=PackingKind.CONCAT_SPLIT, seq_len=4, batch_size=2, pad_id=PAD)
    ordered = [_lists(b) for b in pack_and_batch(_docs(*docs, counts={3: [Count.DROPPED_EMPTY]}), **kwargs)]
    shuffled = [_lists(b) for b in pack_and_batch(_docs(*docs, counts={3: [Count.DROPPED_EMPTY]}), **kwargs,
                                                  shuffle_window=8, seed=3)]
    again = [_lists(b) for b in pack_and_batch(_docs(*docs, counts={3: [Count.DROPPED_EMPTY]}), **kwargs,
                                               shuffle_window=8, seed=3)]
    assert shuffled == again  # seeded

    def rows(batches, lo, hi):
        return sorted(tuple(r) for b in batches[lo:hi] for r in b["inputs"])

    # Rows 0-7 (batches 0-3) and rows 8-15 (batches 4-7) are each a permutation of the same rows in order.
    assert rows(shuffled, 0, 4) == rows(ordered, 0, 4) and rows(shuffled, 4, 8) == rows(ordered, 4, 8)
    assert [b["inputs"] for b in shuffled] != [b["inputs"] for b in ordered]
    assert sum(b["counts"][Count.DROPPED_EMPTY] for b in shuffled) == 1
    def full_rows(batches):  # a row with its targets, segments and positions (the counts ride on the batch)
        keys = ("inputs", "targets", "segment_ids", "positions")
        return sorted(tuple(tuple(b[k][i]) for k in keys) for b in batches for i in range(len(b["inputs"])))

    assert full_rows(shuffled) == full_rows(ordered)
