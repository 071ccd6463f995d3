"""The stage plan (ling_jax.data.stages.plan_stages): lengths, mixtures, schedule phases, errors; the demo's shares."""

from __future__ import annotations

import pytest
from test_data_mixture import data_config

from configs import demo_stages, pretrain_ling_coder_lite
from ling_jax.config import ConfigError
from ling_jax.data import stages as stages_lib
from ling_jax.data.mixture import parse_sources
from ling_jax.train import run_config, tasks


def plan(stages, tokens_per_step=1000):
    return stages_lib.plan_stages(stages, parse_sources(data_config()), tokens_per_step=tokens_per_step,
                                  total_steps=1)


def test_tokens_round_to_steps_and_phases_fill_the_stage():
    s1, s2 = plan([dict(name="a", tokens=2400, schedule=[dict(kind="linear", steps=1, end=1.0),
                                                         dict(kind="constant")]),
                   dict(name="b", steps=4, mixture={"text": 0}, schedule=dict(kind="cosine", end=0.1))])
    assert (s1.start, s1.steps, s2.start, s2.steps) == (0, 2, 2, 4)
    assert [p["steps"] for p in s1.phases] == [1, 1] and s2.phases[0]["steps"] == 4
    assert s2.mixture.targets()["text"] == 0.0 and s1.mixture.targets()["text"] == pytest.approx(0.2)


@pytest.mark.parametrize("stages,message", [
    ([dict(name="a")], r"config.stages\[0\]: give the stage's length as exactly one of steps or tokens"),
    ([dict(name="a", steps=2), dict(name="a", steps=2)], "a name of its own"),
    ([dict(name="a", steps=2, mixture={"prose": 1})], r"names \['prose'\], which are not sources"),
    ([dict(name="a", tokens=10)], "not a whole number of steps"),
    ([dict(name="a", steps=3, schedule=[dict(kind="constant", steps=5)])], "phases last 5 steps, the stage 3"),
    ([dict(name="a", steps=3, schedule=dict(kind="constant")), dict(name="b", steps=2)], "some stages have a sched"),
    ([dict(name="a", steps=3, epochs=2)], r"unknown keys \['epochs'\]"),
])
def test_malformed_stages_are_named(stages, message):
    with pytest.raises(ConfigError, match=message):
        plan(stages)


def test_paper_recipe_has_the_table_and_names_each_missing_source():
    c = pretrain_ling_coder_lite.get_config("raw=/nonexistent/raw")
    stages = tasks.stage_plan(c)
    assert [(s.name, s.steps) for s in stages] == [("stage1", 51_856), ("stage2", 101_328), ("anneal", 37_551)]
    assert c.steps == stages[-1].end
    t = stages[2].mixture.targets()
    assert (t["code"], t["math"], t["code/synthetic"]) == pytest.approx((0.6, 0.2, 0.5))
    found = run_config.problems(c)
    assert len(found) == 5 and "config.data.sources['code/raw']: data.path='/nonexistent/raw'" in found[0]
    assert "config.data.sources['math']" in found[4]


def test_steps_past_the_stages_are_a_problem():
    c = demo_stages.get_config("synthetic")
    c.steps = 261
    assert run_config.problems(c) == ["config.steps=261 goes past the 260 steps of config.stages; set steps <= 260 "
                                      "or lengthen the last stage"]


@pytest.mark.parametrize("arg", ["synthetic", pytest.param(None, marks=pytest.mark.slow)])
def test_demo_stages_shares_within_one_point_after_200_steps(arg, tmp_path):
    """Acceptance: after 200 steps of configs/demo_stages.py (both levels) every share is within 1 point."""
    import sentencepiece  # noqa: F401  (the stdlib sources need a tokenizer; a small one is trained here)

    import ling_jax
    c = demo_stages.get_config(arg)
    tokenizer = None
    if arg is None:
        path = str(tmp_path / "tokenizer.model")
        from ling_jax.data import pipeline
        specials = [c.data.fim_prefix_token, c.data.fim_middle_token, c.data.fim_suffix_token]
        ling_jax.train_sentencepiece(pipeline.iter_documents(c.data, limit=200), path, 2000,
                                     user_defined_symbols=specials)
        tokenizer = ling_jax.load_tokenizer(path)
    it = stages_lib.make_staged_iterator(c.data, tasks.stage_plan(c), tokenizer=tokenizer, seq_len=c.seq_len,
                                         batch_size=c.batch_size, seed=0)
    for step in range(1, 201):
        next(it)
        if step in (100, 200):  # the end of stage1 and of stage2
            stats = it.stats()
            for key in [k for k in stats if k.startswith("target/")]:
                share = stats["share/" + key[len("target/"):]]
                assert abs(share - stats[key]) < 0.01, (step, key, share, stats[key])
    it.close()
