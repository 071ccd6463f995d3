"""`ling_jax.train.run_config`: every run-config mistake is found before any compute, named with its fix."""

from __future__ import annotations

import ml_collections
import pytest

from configs import default, demo, dpo, pretrain_ling_coder_lite, sft
from ling_jax.config import UserError
from ling_jax.train import run_config


def _set(cfg, key, value):
    *path, last = key.split(".")
    for p in path:
        cfg = cfg[p]
    cfg[last] = value


@pytest.mark.parametrize("recipe", [default, demo, sft, dpo, pretrain_ling_coder_lite])
def test_shipped_recipes_have_no_problems_but_their_paths(recipe):
    found = run_config.problems(recipe.get_config())
    assert all("data.path" in p or "init_from" in p for p in found), found


@pytest.mark.parametrize("key,value,expected", [
    ("steps", -1, "config.steps=-1: must be >= 1"),
    ("steps", 0, "config.steps=0: must be >= 1"),
    ("batch_size", 0, "config.batch_size=0: must be >= 1"),
    ("seq_len", 1, "config.seq_len=1: must be >= 2"),
    ("log_every", 0, "config.log_every=0: must be >= 1"),
    ("eval_every", -5, "config.eval_every=-5: must be >= 0"),
    ("sample_temperature", -0.5, "config.sample_temperature=-0.5: must be >= 0"),
    ("data.fim_rate", 1.5, "config.data.fim_rate=1.5: must be <= 1"),
    ("data.eval_fraction", 1.0, "config.data.eval_fraction=1.0: must be < 1"),
    ("data.row_shuffle_window", -2, "config.data.row_shuffle_window=-2: must be >= 0"),
    ("data.row_shuffle_window", True, "config.data.row_shuffle_window=True: must be an integer"),
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0: must be < 1"),
    ("optimizer.eps", 0.0, "config.optimizer.eps=0.0: must be > 0"),
    ("optimizer.clip_norm", float("nan"), "config.optimizer.clip_norm=nan: must be finite"),
    ("dpo.beta", 0.0, "config.dpo.beta=0.0: must be > 0"),
    ("compute_dtype", "float64", "config.compute_dtype='float64': not a DType; use one of float32, bfloat16"),
    ("remat", "some", "config.remat='some': not a Remat; use one of none, full, dots"),
    ("task", "rlhf", "config.task='rlhf': not a Task; use one of pretrain, sft, dpo"),
    ("data.kind", "csv", "config.data.kind='csv': not a SourceKind; use one of synthetic, text_dir"),
    ("schedule.kind", "linear", "config.schedule.kind='linear': not a ScheduleKind"),
    ("optimizer.mu_dtype", "int8", "config.optimizer.mu_dtype='int8': not a DType"),
    ("model", "ling_huge", "config.model='ling_huge': not a zoo preset; use one of tiny"),
    ("init_from", "/no/such/ckpt", "config.init_from='/no/such/ckpt': no such file or directory"),
    ("data.tokenizer", "/no/such/tok.model", "config.data.tokenizer='/no/such/tok.model': no such file"),
    ("compile_topology", "v5p:2x2x1", "is only read with compile_only; add --config.compile_only=true"),
])
def test_each_bad_field_is_named_with_its_fix(key, value, expected):
    cfg = default.get_config()
    _set(cfg, key, value)
    with pytest.raises(run_config.RunConfigError) as e:
        run_config.validate(cfg)
    assert expected in str(e.value)
    assert isinstance(e.value, UserError)


def test_every_problem_is_listed_at_once():
    cfg = default.get_config()
    cfg.steps, cfg.batch_size, cfg.loss.accumulation_steps = -1, 6, 4
    cfg.data.kind, cfg.data.path = "jsonl", ""
    found = run_config.problems(cfg, process_count=4)
    assert found == [
        "config.steps=-1: must be >= 1; set --config.steps to such a value",
        "config.data.path='': data.kind='jsonl' reads files; set --config.data.path to the training data",
        "config.batch_size=6 does not divide by config.loss.accumulation_steps=4; make batch_size a multiple of it",
        "config.batch_size=6 does not divide by the 4 processes of this job; make batch_size a multiple of the "
        "process count",
    ]
    with pytest.raises(run_config.RunConfigError, match=r"^4 problems in the run config:\n  config.steps=-1"):
        run_config.validate(cfg, process_count=4)


def test_inconsistent_schedule_is_reported():
    cfg = default.get_config()
    cfg.schedule.warmup_steps, cfg.schedule.decay_steps = 50, 20
    assert run_config.problems(cfg) == [
        "config.schedule: warmup_cosine needs 0 <= warmup_steps < decay_steps, got 50, 20; fix the schedule section"]


def test_types_are_checked():
    """A recipe file can set a field to the wrong type (the command line cannot: ml_collections checks it)."""
    raw = default.get_config().to_dict()
    raw["steps"], raw["optimizer"]["clip_norm"] = 1e4, None  # None: clipping off, allowed
    assert run_config.problems(ml_collections.ConfigDict(raw)) == [
        "config.steps=10000.0: must be an integer; set --config.steps to such a value"]


def test_glob_paths_count_as_existing(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    cfg = default.get_config()
    cfg.data.kind, cfg.data.path = "jsonl", str(tmp_path / "*.jsonl")
    assert run_config.problems(cfg) == []
    cfg.data.path = str(tmp_path / "*.parquet")
    assert run_config.problems(cfg) == [f"config.data.path={cfg.data.path!r}: no such file or directory; set "
                                        "--config.data.path to the training data (file, directory or glob)"]


@pytest.mark.parametrize("eval_every,steps,start,expected", [
    (0, 10, 0, False), (500, 4, 0, False), (3, 10, 0, True), (5, 10, 5, True), (5, 9, 5, False), (1, 1, 0, True)])
def test_evaluates_only_when_an_eval_step_lies_ahead(eval_every, steps, start, expected):
    cfg = default.get_config()
    cfg.eval_every, cfg.steps = eval_every, steps
    assert run_config.evaluates(cfg, start) is expected


def test_demo_before_recipe_is_valid_and_differs_where_the_tuning_changed_it():
    tuned, before = demo.get_config(), demo.get_config("before")
    assert all("data.path" in p for p in run_config.problems(before))
    assert (before.model_overrides.num_hidden_layers, tuned.model_overrides.num_hidden_layers) == (4, 2)
    assert (before.data.row_shuffle_window, tuned.data.row_shuffle_window) == (0, 1024)
    assert before.sample_prompts == tuned.sample_prompts and before.data.path == tuned.data.path
    with pytest.raises(ValueError, match="'after'"):
        demo.get_config("after")
