"""The paper's data curation (section 2) as one Apache Beam pipeline: `python -m ling_jax.curation`.

Modules, in pipeline order: `reading` (inputs), `languages` (identification), `rules` / `text_rules`
(filters), `analysis` + `grammars` (tree-sitter code metrics), `minhash` + `dedup` (exact and near
deduplication), `quality` (fastText score), `pairs` (code-comment pairs), `imports` + `resolve` +
`ordering` (repository-level documents), `writing` (ArrayRecord shards), `report`; `stages` holds the
per-record filter transforms, `pipeline` composes them, `settings` validates the config.
"""
