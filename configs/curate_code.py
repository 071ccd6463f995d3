"""Curates source code as in the paper (section 2): rules, metrics, dedup, repository order, pairs, quality.

    python -m ling_jax.curation --config configs/curate_code.py --config.input=REPOS_DIR --config.output=OUT

Every operator and threshold is a field below (defaults: StarCoder's filters and the paper's). Then train
on it: python train.py --config configs/pretrain_ling_coder_lite.py --config.data.kind=array_record
--config.data.record_format=json --config.data.path=OUT/documents
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The curation config; `arg` is unused."""
    del arg
    c = ml_collections.ConfigDict()
    c.input = ""  # A directory of repositories (input_kind=repositories), or jsonl / parquet files or a glob.
    c.input_kind = "repositories"  # InputKind: repositories | stack (The Stack v2 records) | text (text jsonl).
    c.output = ""  # A new directory: documents/, pairs/, report.json, report.md, histograms.png.
    c.overwrite = False  # Replace an existing output directory.
    c.languages = ""  # Comma-separated language names to keep (ling_jax.curation.languages); "" keeps all.
    c.runner = "local"  # Runner: local (Beam FnApiRunner here) | dataflow | flink | spark | portable.
    c.running_mode = "multi_processing"  # RunningMode (local): in_memory | multi_threading | multi_processing.
    c.num_workers = 2  # Local worker processes / threads.
    c.pipeline_options = ""  # Extra Beam flags, e.g. "--project=P --region=R --temp_location=gs://B/tmp".
    c.num_shards = 4  # ArrayRecord files per output.
    c.write_jsonl = False  # Also write each shard as jsonl.

    c.read = ml_collections.ConfigDict()
    c.read.max_file_bytes = 1_000_000  # Larger files are dropped (too_large).
    c.read.text_field = "text"  # input_kind=text: the key holding the document.

    c.code_rules = ml_collections.ConfigDict()
    c.code_rules.max_line_length = 1000  # StarCoder: longest line.
    c.code_rules.max_mean_line_length = 100.0  # StarCoder: average line length.
    c.code_rules.min_alnum_fraction = 0.25  # StarCoder: alphanumeric fraction.
    c.code_rules.autogen_lines = 5  # StarCoder: first lines searched for auto-generated markers.
    c.code_rules.max_encoded_fraction = 0.5  # StarCoder: base64 / hex / unicode-escape blobs, fraction.
    c.code_rules.max_encoded_run = 1024  # StarCoder: longest such blob.
    c.code_rules.data_min_chars = 50  # StarCoder: data formats (json, yaml, ...) size limits.
    c.code_rules.data_max_chars = 5000
    c.code_rules.data_min_alpha_fraction = 0.5  # StarCoder: data formats' alphabetic fraction.
    c.code_rules.max_url_fraction = 0.6  # Paper: URLs and IPv4 / IPv6 addresses.
    c.code_rules.max_pii_fraction = 0.5  # Paper: e-mails, phone numbers, date-times.
    c.code_rules.max_garbled_fraction = 0.01  # Paper: replacement / control characters, mojibake.
    c.code_rules.max_line_repetition = 0.7  # Paper: repeated lines.
    c.code_rules.max_word_repetition = 0.7  # Paper: repeated word 5-grams.

    c.text_rules = ml_collections.ConfigDict()  # input_kind=text: code-related text (no line limits).
    c.text_rules.drop_images = True  # Image references drop a sample.
    c.text_rules.drop_links = True  # Links drop a sample.
    c.text_rules.drop_placeholders = True  # Template placeholders drop a sample.
    c.text_rules.min_chars = 1  # Shorter samples drop.
    c.text_rules.min_alnum_fraction = 0.25  # Fewer alphanumerics drop.
    c.text_rules.max_pii_fraction = 0.5  # E-mails, phones, date-times.
    c.text_rules.max_garbled_fraction = 0.01  # Garbled characters.
    c.text_rules.max_line_repetition = 0.7  # Repeated lines.
    c.text_rules.max_word_repetition = 0.7  # Repeated word 5-grams.

    c.metrics = ml_collections.ConfigDict()  # Program analytics (tree-sitter for 16 languages).
    c.metrics.min_comment_ratio = 0.0  # Comment characters / non-blank characters, lower limit.
    c.metrics.max_comment_ratio = 0.9  # Upper limit (files that are all comment).
    c.metrics.min_eloc = 1  # Effective lines of code (non-blank, non-comment).
    c.metrics.max_syntax_errors = 0  # ERROR / MISSING nodes of the parse allowed (-1: no syntax filter).

    c.dedup = ml_collections.ConfigDict()
    c.dedup.exact = True  # SHA-256 of the text.
    c.dedup.near = True  # MinHash LSH near-deduplication (The Stack).
    c.dedup.num_perm = 256  # MinHash permutations.
    c.dedup.ngram = 5  # Word n-gram shingles.
    c.dedup.threshold = 0.85  # Jaccard similarity of duplicates.
    c.dedup.bands = 0  # LSH bands (0: tuned for threshold).
    c.dedup.rows = 0  # LSH rows per band (0: tuned).
    c.dedup.false_positive_weight = 0.1  # Band tuning weights (candidates are verified).
    c.dedup.false_negative_weight = 0.9

    c.quality = ml_collections.ConfigDict()  # fastText code-quality score (off without model / train_data).
    c.quality.model = ""  # A trained fastText .bin to apply.
    c.quality.train_data = ""  # Or labelled jsonl {"text", "label"} to train one.
    c.quality.positive_label = "high"  # The label whose probability is the score.
    c.quality.threshold = 0.0  # Records scoring lower are dropped.
    c.quality.epoch = 25  # fastText epochs.
    c.quality.lr = 0.1  # fastText learning rate.
    c.quality.word_ngrams = 2  # fastText word n-grams.
    c.quality.dim = 64  # fastText vector size.
    c.quality.bucket = 100_000  # fastText n-gram hash buckets (model size ~ bucket * dim floats).

    c.pairs = ml_collections.ConfigDict()  # Code-comment pairs (paper section 2.3.2) into OUTPUT/pairs.
    c.pairs.enabled = True
    c.pairs.min_code_chars = 30  # Code length limits.
    c.pairs.max_code_chars = 100_000
    c.pairs.min_code_lines = 1  # Code line limits.
    c.pairs.max_code_lines = 100
    c.pairs.min_comment_chars = 30  # Comment length limits.
    c.pairs.max_comment_chars = 100_000
    c.pairs.max_special_fraction = 0.8  # Comments with this fraction of special characters drop.

    c.repository = ml_collections.ConfigDict()  # Repository-level documents (paper section 2.2.2).
    c.repository.enabled = True  # One document per repository in import order (False: one per file).
    c.repository.repo_token = "<repo_name>"  # Starts a document, followed by the repository name.
    c.repository.file_token = "<file_sep>"  # Starts each file, followed by its path and a newline.
    return c
