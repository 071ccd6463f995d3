"""The per-record stages: language identification, the rule filters and the code-metrics filter.

Each is a Beam transform over records that counts what comes in, goes out and is dropped (by reason), and
`lang_<language>` of what goes out.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from ling_jax.curation.analysis import analyse
from ling_jax.curation.languages import identify
from ling_jax.curation.records import FilterStage, Reason, Record, Stage, count, count_drop, count_in, count_out, timed
from ling_jax.curation.report import HISTOGRAMS
from ling_jax.curation.rules import CodeRules, check_code, line_lengths
from ling_jax.curation.settings import bounded
from ling_jax.curation.text_rules import TextRules, check_text


@dataclasses.dataclass(frozen=True)
class MetricsSettings:
    """Program-analytics filters (config section `metrics`)."""

    min_comment_ratio: float = bounded(0.0, 0.0, 1.0)  # Drop files with fewer comments (0: keep all).
    max_comment_ratio: float = bounded(0.9, 0.0, 1.0)  # Drop files that are (almost) all comment.
    min_eloc: int = bounded(1, 0)  # Drop files with fewer effective lines of code.
    max_syntax_errors: int = bounded(0, -1)  # Drop files whose parse has more ERROR/MISSING nodes (-1: off).


class IdentifyLanguage(beam.PTransform):
    """Sets `language` from the file name; drops unknown languages and those outside `languages`."""

    def __init__(self, languages: frozenset[str]):
        super().__init__()
        self.languages = languages

    def expand(self, records):
        selected = self.languages

        def identify_one(rec: Record):
            count_in(Stage.LANGUAGE, rec)
            lang = identify(rec["path"])
            if lang is None:
                count_drop(Stage.LANGUAGE, Reason.UNKNOWN_LANGUAGE, rec)
                return
            if selected and lang.name not in selected:
                count_drop(Stage.LANGUAGE, Reason.LANGUAGE_NOT_SELECTED, rec)
                return
            rec = {**rec, "language": lang.name}
            count(Stage.LANGUAGE, f"lang_{lang.name}")
            count_out(Stage.LANGUAGE, rec)
            yield rec

        return records | "Identify" >> beam.FlatMap(timed(Stage.LANGUAGE, identify_one))


class CodeRuleFilter(beam.PTransform):
    """Drops source files breaking a source-code rule."""

    def __init__(self, rules: CodeRules):
        super().__init__()
        self.rules = rules

    def expand(self, records):
        rules = self.rules
        return records | "CodeRules" >> beam.ParDo(FilterStage(Stage.RULES, lambda r: check_code(r, rules)))


class TextRuleFilter(beam.PTransform):
    """Drops code-related text breaking a text rule."""

    def __init__(self, rules: TextRules):
        super().__init__()
        self.rules = rules

    def expand(self, records):
        rules = self.rules
        return records | "TextRules" >> beam.ParDo(FilterStage(Stage.RULES, lambda r: check_text(r, rules)))


def metrics_check(rec: Record, s: MetricsSettings) -> Reason | None:
    """The first metrics filter the attached `rec["metrics"]` fail, or None."""
    m = rec["metrics"]
    if not s.min_comment_ratio <= m["comment_ratio"] <= s.max_comment_ratio:
        return Reason.COMMENT_RATIO
    if m["eloc"] < s.min_eloc:
        return Reason.ELOC
    if s.max_syntax_errors >= 0 and m["syntax_errors"] is not None and m["syntax_errors"] > s.max_syntax_errors:
        return Reason.SYNTAX_ERROR
    return None


class CodeMetricsFilter(beam.PTransform):
    """Attaches the code metrics (`ling_jax.curation.analysis`) and drops files outside the limits."""

    def __init__(self, settings: MetricsSettings):
        super().__init__()
        self.settings = settings

    def expand(self, records):
        s = self.settings

        def measure(rec: Record):
            count_in(Stage.METRICS, rec)
            lengths = line_lengths(rec["text"])
            metrics = {**analyse(rec["language"], rec["text"]).to_dict(),
                       "mean_line_length": round(sum(lengths) / len(lengths), 3), "max_line_length": max(lengths)}
            rec = {**rec, "metrics": metrics}
            reason = metrics_check(rec, s)
            if reason is not None:
                count_drop(Stage.METRICS, reason, rec)
                return
            HISTOGRAMS["comment_ratio"].add(Stage.METRICS, metrics["comment_ratio"])
            HISTOGRAMS["mean_line_length"].add(Stage.METRICS, metrics["mean_line_length"])
            count_out(Stage.METRICS, rec)
            yield rec

        return records | "Measure" >> beam.FlatMap(timed(Stage.METRICS, measure))
