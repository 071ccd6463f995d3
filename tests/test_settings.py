"""The data config (ling_jax.data.settings): defaults, the post-training fields, and reading fields and choices."""

from __future__ import annotations

import ml_collections
import pytest

from ling_jax.config import ConfigError
from ling_jax.data.settings import (
    BadRecords,
    PackingKind,
    SourceKind,
    Truncation,
    default_data_config,
    default_post_training_data_config,
    option,
)


def test_post_training_config_is_the_pretraining_one_plus_the_chat_fields():
    pre, post = default_data_config(), default_post_training_data_config()
    assert set(post) - set(pre) == {"chat", "truncation", "bad_records"}
    assert (post.kind, post.packing, post.add_eos, post.truncation, post.bad_records) == (
        "jsonl", "first_fit", False, "drop", "error")
    assert (pre.kind, pre.packing, pre.add_eos, pre.eval_fraction) == ("synthetic", "concat_split", True, 0.01)


def test_option_reads_a_field_or_its_default():
    cfg = ml_collections.ConfigDict({"path": "/data", "packing": "first_fit"})
    assert option(cfg, "path") == "/data"
    assert option(cfg, "eval_fraction") == 0.01  # A config that predates the field gets the default.
    assert option(cfg, "truncation", Truncation) is Truncation.DROP  # A post-training field's default.
    assert option(cfg, "bad_records", BadRecords) is BadRecords.ERROR
    assert option(cfg, "packing", PackingKind) is PackingKind.FIRST_FIT
    assert option(cfg, "kind", SourceKind) is SourceKind.SYNTHETIC
    cfg.kind = SourceKind.PARQUET  # An enum member is taken as it is.
    assert option(cfg, "kind", SourceKind) is SourceKind.PARQUET
    assert option({"worker_count": 3}, "worker_count") == 3  # A plain dict works too.


def test_an_unknown_choice_names_the_field_the_value_and_the_choices():
    cfg = ml_collections.ConfigDict({"packing": "best_fit"})
    with pytest.raises(ConfigError, match=r"^data\.packing='best_fit'; expected one of 'concat_split', "
                                          r"'first_fit': set data\.packing to one of them$"):
        option(cfg, "packing", PackingKind)
    with pytest.raises(KeyError):
        option(cfg, "no_such_field")


def test_row_shuffle_is_off_by_default():
    assert default_data_config().row_shuffle_window == 0
