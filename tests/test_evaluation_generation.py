"""Batched generation for evaluation (ling_jax.evaluation.generation): rows cut at the first of several stop ids."""

from __future__ import annotations

from ling_jax.evaluation.generation import decode_rows


def test_decode_rows_stops_at_any_of_the_stop_ids(tiny, golden):
    model, params = tiny
    prompts = [[int(t) for t in row] for row in golden["greedy_prompt"]]
    want = [[int(t) for t in row[len(prompts[0]):]] for row in golden["greedy_output"]]  # 12 greedy tokens each
    free = decode_rows(model, params, prompts, max_new_tokens=12, eos=None, pad=0)
    assert free == want
    first, second = want[0][3], want[1][5]  # stop row 0 after its 4th token and row 1 after its 6th
    stops = [first, second]
    cut = decode_rows(model, params, prompts, max_new_tokens=12, eos=stops, pad=0)
    for row, got in zip(want, cut, strict=True):
        at = next(i for i, t in enumerate(row) if t in stops)
        assert got == row[: at + 1]  # the stop id is kept as the last id
    one = decode_rows(model, params, prompts, max_new_tokens=12, eos=first, pad=0)[0]  # a single id
    assert one == want[0][: want[0].index(first) + 1]
