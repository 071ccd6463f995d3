"""Weighted nested mixtures by tokens (ling_jax.data.mixture, ling_jax.data.stages): shares, resume, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ling_jax.config import ConfigError
from ling_jax.data import stages as stages_lib
from ling_jax.data.counting import DataError
from ling_jax.data.mixture import needs_tokenizer, parse_sources
from ling_jax.data.settings import default_data_config

STAGE2 = {"code": 65, "text": 20, "math": 15, "code/raw": 75, "code/related": 20, "code/synthetic": 5}


def data_config(**math):
    d = default_data_config()
    d.vocab_size, d.synthetic_num_docs, d.synthetic_max_len = 256, 400, 48
    d.sources = [dict(name="code", weight=70, sources=[dict(name="raw", weight=94, synthetic_seed=1),
                                                       dict(name="related", weight=5, synthetic_seed=2),
                                                       dict(name="synthetic", weight=1, synthetic_seed=3)]),
                 dict(name="text", weight=20, synthetic_seed=4, synthetic_max_len=200),
                 dict(name="math", weight=10, synthetic_seed=5, synthetic_max_len=8, **math)]
    return d


def iterator(d, plan=None, batch_size=4, seq_len=64):
    plan = plan or stages_lib.plan_stages([], parse_sources(d), tokens_per_step=batch_size * seq_len, total_steps=10)
    return stages_lib.make_staged_iterator(d, plan, tokenizer=None, seq_len=seq_len, batch_size=batch_size, seed=0)


def two_stages(d, steps=(5, 5)):
    return stages_lib.plan_stages([dict(name="s1", steps=steps[0]), dict(name="s2", steps=steps[1], mixture=STAGE2)],
                                  parse_sources(d), tokens_per_step=256, total_steps=sum(steps))


def test_tree_paths_weights_and_targets():
    root = parse_sources(data_config())
    assert [leaf.path for leaf in root.leaves()] == ["code/raw", "code/related", "code/synthetic", "text", "math"]
    targets = root.targets()
    assert targets["code"] == pytest.approx(0.7) and targets["code/related"] == pytest.approx(0.05)
    assert root.leaves()[3].data.synthetic_max_len == 200 and root.leaves()[0].data.synthetic_max_len == 48
    assert parse_sources(default_data_config()) is None and not needs_tokenizer(data_config())


def test_token_shares_meet_both_levels_of_targets_within_half_a_point():
    it = iterator(data_config(), batch_size=8)
    for _ in range(60):
        next(it)
    stats = it.stats()
    for path, target in parse_sources(data_config()).targets().items():
        assert abs(stats[f"share/{path}"] - target) < 0.005, (path, stats[f"share/{path}"], target)
        assert stats[f"target/{path}"] == pytest.approx(target)


@pytest.mark.parametrize("stop_at", [3, 7])  # mid-stage 1, and in stage 2 (the state saved across the boundary)
def test_resume_is_bit_identical_mid_stage_and_across_the_boundary(stop_at):
    d = data_config()
    it = iterator(d, two_stages(d))
    for _ in range(stop_at):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(10 - stop_at)]
    again = iterator(d, two_stages(d))
    again.set_state(state)
    for a, b in zip(rest, [next(again) for _ in range(10 - stop_at)], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert again.stats()["stage"] == 1 and again.stats()["target/code"] == pytest.approx(0.65)


def test_stage_switches_mixture_at_its_first_batch():
    d = data_config()
    it = iterator(d, two_stages(d, (3, 3)))
    seen = [(next(it), it.stats()["stage"])[1] for _ in range(6)]
    assert seen == [0, 0, 0, 1, 1, 1]


def test_changed_weights_on_resume_are_allowed_and_logged(capsys):
    d = data_config()
    it = iterator(d)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    d2 = data_config()
    d2.sources[1]["weight"] = 40  # text 20 -> 40
    again = iterator(d2)
    again.set_state(state)
    assert "text 20.0 -> 40.0" in capsys.readouterr().out
    for _ in range(30):
        next(again)
    assert abs(again.stats()["share/text"] - 40 / 120) < 0.01


def test_exhausted_source_cycles_or_stops_naming_it():
    it = iterator(data_config(), batch_size=8)
    for _ in range(40):  # math: 400 documents of <= 8 tokens, cycled
        next(it)
    d = data_config(on_exhausted="stop", synthetic_num_docs=3)
    it = iterator(d)
    with pytest.raises(DataError, match=r"source 'math' of data.sources ran out .*on_exhausted='cycle'"):
        for _ in range(40):
            next(it)


def test_empty_source_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.jsonl").write_text("")
    d = data_config()
    d.sources[1] = dict(name="text", weight=20, kind="jsonl", path=str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"source 'text' of data.sources: .*holds no documents"):
        iterator(d)


@pytest.mark.parametrize("change,message", [
    (lambda s: s[1].update(colour=1), r"data.sources\['text'\] has unknown keys \['colour'\]"),
    (lambda s: s[1].update(name="code"), "names .* repeat"),
    (lambda s: s[2].update(weight=-1), r"data.sources\['math'\].weight=-1: a weight must be"),
    (lambda s: [c.update(weight=0) for c in s[0]["sources"]], "every source of group 'code' has weight 0"),
    (lambda s: s[2].update(on_exhausted="never"), r"data.sources\['math'\].on_exhausted='never'"),
    (lambda s: s[0].update(on_exhausted="stop"), "a group has no data of its own"),
])
def test_malformed_sources_are_named(change, message):
    d = data_config()
    change(d.sources)
    with pytest.raises(ConfigError, match=message):
        parse_sources(d)
