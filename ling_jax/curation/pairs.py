"""Code-comment pairs (paper section 2.3.2): functions and methods with their docstring or leading comment.

`extract_pairs(language, text)` walks the tree-sitter AST for function and method definitions and takes
the docstring (Python) or the comments directly above the definition. `check_pair` applies the paper's
rules; `CodeCommentPairs` is the Beam transform, with the MD5 deduplication (one pair per MD5 of code and
comment, the best-ranked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import apache_beam as beam

from ling_jax.curation import grammars
from ling_jax.curation.dedup import keep_best
from ling_jax.curation.languages import GRAMMAR_LANGUAGES
from ling_jax.curation.records import DocKind, Reason, Record, Stage, count_drop, count_in, record, timed
from ling_jax.curation.settings import bounded

_FUNCTIONS = {
    "python": ("function_definition",), "java": ("method_declaration", "constructor_declaration"),
    "javascript": ("function_declaration", "method_definition"),
    "typescript": ("function_declaration", "method_definition"), "c": ("function_definition",),
    "cpp": ("function_definition",), "csharp": ("method_declaration", "constructor_declaration"),
    "go": ("function_declaration", "method_declaration"), "rust": ("function_item",),
    "php": ("function_definition", "method_declaration"), "ruby": ("method", "singleton_method"),
    "kotlin": ("function_declaration",), "scala": ("function_definition",), "swift": ("function_declaration",),
    "shell": ("function_definition",), "lua": ("function_declaration",),
}
_COMMENT_MARKS = re.compile(r"^\s*(?:/\*+|\*+/|\*|///?|#+|--+(?:\[\[)?|\]\]|'''|\"\"\"|!)?\s?", re.MULTILINE)
_COMMENT_END = re.compile(r"\s*(?:\*+/|-\}|\]\])\s*$", re.MULTILINE)
_ANNOTATION = re.compile(r"\b(?:TODO|BUG|FIXME)\s*:", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class PairSettings:
    """Code-comment pairs (config section `pairs`); the paper's seven rules."""

    enabled: bool = bounded(True)  # Extract pairs into OUTPUT/pairs.
    min_code_chars: int = bounded(30, 0)
    max_code_chars: int = bounded(100_000, 1)
    min_code_lines: int = bounded(1, 0)
    max_code_lines: int = bounded(100, 1)
    min_comment_chars: int = bounded(30, 0)
    max_comment_chars: int = bounded(100_000, 1)
    max_special_fraction: float = bounded(0.8, 0.0, 1.0)  # Comments with this many special characters drop.


def clean_comment(raw: str) -> str:
    """The text of a comment without its markers."""
    return _COMMENT_END.sub("", _COMMENT_MARKS.sub("", raw.strip())).strip().strip("\"'").strip()


def _docstring(node) -> str | None:
    body = node.child_by_field_name("body")
    first = body.named_children[0] if body is not None and body.named_children else None
    if first is not None and first.type == "expression_statement" and first.named_children and \
            first.named_children[0].type == "string":
        return grammars.text_of(first.named_children[0])
    return None


def _leading_comment(node) -> str | None:
    comments = []
    prev, row = node.prev_sibling, node.start_point[0]
    while prev is not None and "comment" in prev.type and prev.end_point[0] >= row - 1:
        comments.append(grammars.text_of(prev))
        prev, row = prev.prev_sibling, prev.start_point[0]
    return "\n".join(reversed(comments)) if comments else None


def extract_pairs(language: str, text: str) -> list[tuple[str, str]]:
    """`(code, comment)` of every function / method of a file that has a docstring or leading comment."""
    if language not in GRAMMAR_LANGUAGES:
        return []
    tree = grammars.parse(language, text)
    query = " ".join(f"({t}) @f" for t in _FUNCTIONS[language] if grammars.has_node_type(language, t))
    found = []
    for _, node in grammars.captures(language, tree.root_node, query):
        raw = _docstring(node) if language == "python" else None
        target = node.parent if node.parent is not None and node.parent.type == "decorated_definition" else node
        raw = raw or _leading_comment(target)
        if raw:
            found.append((grammars.text_of(node), "\n".join(clean_comment(line) for line in raw.splitlines())
                          .strip()))
    return found


def check_pair(code: str, comment: str, s: PairSettings) -> Reason | None:
    """The first pair rule `(code, comment)` breaks, or None."""
    if not s.min_code_chars <= len(code) <= s.max_code_chars:
        return Reason.PAIR_CODE_LENGTH
    if not s.min_code_lines <= len(code.splitlines()) <= s.max_code_lines:
        return Reason.PAIR_CODE_LINES
    if not comment or not s.min_comment_chars <= len(comment) <= s.max_comment_chars:
        return Reason.PAIR_COMMENT_LENGTH
    special = sum(not (c.isalnum() or c.isspace()) for c in comment)
    if special / len(comment) >= s.max_special_fraction:
        return Reason.PAIR_SPECIAL_CHARACTERS
    if _ANNOTATION.search(comment):
        return Reason.PAIR_ANNOTATION
    return None


def file_pairs(rec: Record, settings: PairSettings):
    """The pair records of one file record that pass the rules."""
    for i, (code, comment) in enumerate(extract_pairs(rec["language"], rec["text"])):
        pair = record(rec["repo"], f"{rec['path']}#{i}", f"{comment}\n{code}", DocKind.PAIR,
                      language=rec["language"], stars=rec.get("stars", 0), license=rec.get("license"),
                      code=code, comment=comment)
        count_in(Stage.PAIRS, pair)
        reason = check_pair(code, comment, settings)
        if reason is None:
            yield hashlib.md5(f"{code}\0{comment}".encode()).hexdigest(), pair
        else:
            count_drop(Stage.PAIRS, reason, pair)


class CodeCommentPairs(beam.PTransform):
    """File records -> code-comment pair records (rules applied, MD5-deduplicated)."""

    def __init__(self, settings: PairSettings):
        super().__init__()
        self.settings = settings

    def expand(self, records):
        settings = self.settings
        return (records | "ExtractPairs" >> beam.FlatMap(timed(Stage.PAIRS, file_pairs), settings)
                | "GroupByMd5" >> beam.GroupByKey()
                | "KeepOne" >> beam.FlatMap(lambda kv: keep_best(Stage.PAIRS, Reason.PAIR_DUPLICATE, list(kv[1]))))
