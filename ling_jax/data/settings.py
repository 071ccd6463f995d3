"""The `data` section of a run config: its fields and defaults, the enums of its choices, and one reader.

Pre-training recipes start from `default_data_config()`, SFT and DPO recipes from
`default_post_training_data_config()` (the same fields plus the chat template, `truncation` and
`bad_records`). Code reads a field with `option(data_cfg, name)`, which falls back to the field's
default when a config predates it, and with `option(data_cfg, name, SomeEnum)` for a choice, which
turns the string into the enum member or raises a `ConfigError` naming the field, the value and the
accepted values.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

import ml_collections

from ling_jax.config import ConfigError
from ling_jax.data import chat, fim

__all__ = ["BadRecords", "Exhausted", "PackingKind", "RecordFormat", "SourceKind", "Truncation", "default_data_config",
           "default_post_training_data_config", "option", "parse_choice"]

E = TypeVar("E", bound=enum.Enum)


class SourceKind(enum.Enum):
    """Where documents come from (`data.kind`)."""

    SYNTHETIC = "synthetic"
    TEXT_DIR = "text_dir"
    JSONL = "jsonl"
    PARQUET = "parquet"
    ARRAY_RECORD = "array_record"


class RecordFormat(enum.Enum):
    """What one ArrayRecord record holds (`data.record_format`)."""

    TEXT = "text"  # The document's UTF-8 text.
    JSON = "json"  # A UTF-8 JSON object; the document is its `text_field` string (ling_jax.curation's output).


class PackingKind(enum.Enum):
    """How documents are packed into rows of `seq_len` tokens (`data.packing`)."""

    CONCAT_SPLIT = "concat_split"  # Concatenate and cut at seq_len: no padding; long documents continue in later rows.
    FIRST_FIT = "first_fit"  # First-fit bin packing: documents stay whole (split only if > seq_len); rows are padded.


class Truncation(enum.Enum):
    """What happens to an SFT / DPO record longer than `seq_len` tokens (`data.truncation`)."""

    DROP = "drop"  # Drop it (counted as dropped_too_long).
    TRUNCATE_RIGHT = "truncate_right"  # Keep its first seq_len tokens (the end of the last reply is lost).
    TRUNCATE_LEFT = "truncate_left"  # Keep its last seq_len tokens (the start of the conversation is lost).


class Exhausted(enum.Enum):
    """What a source of a mixture does at the end of a pass over its documents (`on_exhausted` of a source)."""

    CYCLE = "cycle"  # Start another pass, reshuffled (the default).
    STOP = "stop"  # Stop the run with a `DataError` naming the source (its data is used at most once).


class BadRecords(enum.Enum):
    """What happens to an SFT / DPO record that cannot be used (`data.bad_records`)."""

    ERROR = "error"  # Stop with a message naming the file, the line and the problem.
    SKIP = "skip"  # Drop it (counted as dropped_malformed).


def default_data_config() -> ml_collections.ConfigDict:
    """The data section of a pre-training run config, every field at its default."""
    cfg = ml_collections.ConfigDict()
    cfg.kind = SourceKind.SYNTHETIC.value  # SourceKind: synthetic | text_dir | jsonl | parquet | array_record.
    cfg.path = ""  # A file, a directory (searched recursively, hidden entries skipped) or a glob.
    cfg.text_field = "text"  # jsonl / parquet / array_record json records: the key / column holding the text.
    cfg.record_format = RecordFormat.TEXT.value  # array_record: RecordFormat text (UTF-8) | json (curation output).
    cfg.file_pattern = "*.py"  # text_dir: which files under `path` are documents (one file = one document).
    cfg.exclude = ""  # text_dir: comma-separated globs (relative to `path`) of files to leave out.
    cfg.tokenizer = ""  # Tokenizer path; train.py loads it and passes the object (synthetic needs none).
    cfg.vocab_size = 512  # synthetic: token ids are drawn from [0, vocab_size).
    cfg.synthetic_num_docs = 100_000  # synthetic: number of documents.
    cfg.synthetic_max_len = 0  # synthetic: documents have 2..synthetic_max_len tokens (0: seq_len).
    cfg.synthetic_seed = 0  # synthetic: which random walks (0: the original ones; mixtures give each source its own).
    cfg.packing = PackingKind.CONCAT_SPLIT.value  # PackingKind: concat_split (no padding) | first_fit (padded).
    cfg.fim_rate = 0.0  # Probability that a document is fill-in-the-middle transformed (StarCoder: 0.5).
    cfg.fim_spm_rate = 0.5  # Fraction of FIM documents in SPM rather than PSM format (see ling_jax.data.fim).
    cfg.fim_prefix_token = fim.LING_FIM_TOKENS[0]  # Sentinel token strings; they must be in the tokenizer.
    cfg.fim_middle_token = fim.LING_FIM_TOKENS[1]
    cfg.fim_suffix_token = fim.LING_FIM_TOKENS[2]
    cfg.add_bos = False  # Prepend the tokenizer's BOS to every document.
    cfg.add_eos = True  # Append the tokenizer's EOS to every document (the model learns where documents end).
    cfg.shuffle = True  # Global shuffle of the documents by seed, different every epoch.
    # Training rows shuffled within windows of this many packed rows (Grain's window shuffle, seeded, restored
    # exactly on resume), so that a batch mixes many documents rather than consecutive rows of one long file; 0 = off.
    cfg.row_shuffle_window = 0
    cfg.eval_fraction = 0.01  # Fraction of documents held out for make_eval_batches (by a hash of the index).
    cfg.num_epochs = None  # Passes over the data (None: repeat forever).
    cfg.worker_count = 0  # Grain worker processes for reading / tokenizing / packing (0: in this process).
    # A weighted mixture instead of the one source above (ling_jax.data.mixture): a list of dicts, each with `name`,
    # `weight` and either the fields of one source (kind, path, text_field, ...; unset ones come from this section)
    # and `on_exhausted` (Exhausted: cycle | stop), or `sources` (a nested group). Empty: the one source above.
    cfg.sources = []
    return cfg


def default_post_training_data_config() -> ml_collections.ConfigDict:
    """The `data` section of the SFT and DPO recipes: `default_data_config()` plus the chat fields."""
    cfg = default_data_config()
    cfg.kind = SourceKind.JSONL.value  # SFT / DPO read jsonl records (one JSON object per line).
    cfg.packing = PackingKind.FIRST_FIT.value  # SFT packs whole conversations; DPO pads one pair per row.
    cfg.add_eos = False  # Unused: the chat template ends every reply with its end-of-text token.
    cfg.chat = chat.default_chat_config()  # The chat template's strings.
    cfg.truncation = Truncation.DROP.value  # Truncation: drop | truncate_right | truncate_left (records > seq_len).
    cfg.bad_records = BadRecords.ERROR.value  # BadRecords: error (stop, naming file and line) | skip (count).
    return cfg


# The default of every field: the pre-training defaults, and the post-training ones for the fields only
# post-training configs have.
_DEFAULTS = {**default_post_training_data_config(), **default_data_config()}


def option(data_cfg: ml_collections.ConfigDict, name: str, choices: type[E] | None = None) -> Any:
    """The value of `data.<name>`, or its default when `data_cfg` predates the field.

    Args:
      data_cfg: The data section of a run config.
      name: The field.
      choices: An enum: return the member the value names (the value may already be one).

    Raises:
      ConfigError: `choices` has no member of that value (the message names the field and the choices).
    """
    value = data_cfg.get(name, _DEFAULTS[name])
    return value if choices is None else parse_choice(value, f"data.{name}", choices)


def parse_choice(value: Any, name: str, choices: type[E], error: type[Exception] = ConfigError) -> E:
    """The member of the enum `choices` whose value is `value` (`value` itself when it is a member).

    Raises:
      error: No member has that value; the message names the field `name`, the value and the accepted values.
    """
    if isinstance(value, choices):
        return value
    try:
        return choices(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in choices)
        raise error(f"{name}={value!r}; expected one of {accepted}: set {name} to one of them") from None
