"""Code metrics by program analysis: comment ratio, effective lines of code and syntax correctness.

For the 16 languages with a grammar the comments come from the tree-sitter AST (comment nodes, plus
Python docstrings) and syntax correctness from the parse (the number of ERROR and MISSING nodes); for the
other languages of the table comments come from their comment syntax and `syntax_errors` is None.

- `comment_ratio`: characters inside comments / all non-whitespace characters.
- `eloc`: effective lines of code, lines with a non-blank character outside every comment.
- `syntax_errors`: ERROR plus MISSING nodes of the parse (0: the file parses), None without a grammar.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from ling_jax.curation import grammars
from ling_jax.curation.languages import BY_NAME, GRAMMAR_LANGUAGES

_DOCSTRINGS = ("(module . (expression_statement (string) @c)) (block . (expression_statement (string) @c))")
_ERRORS = "(ERROR) @e (MISSING) @m"
_SPACE = re.compile(rb"\s+")
_NOT_NEWLINE = re.compile(rb"[^\n]")


@dataclasses.dataclass(frozen=True)
class CodeMetrics:
    """The metrics attached to every source-code record (`record["metrics"]`)."""

    comment_ratio: float
    eloc: int
    lines: int
    syntax_errors: int | None

    def to_dict(self) -> dict[str, Any]:
        """The metrics as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _ast_comment_spans(language: str, tree: Any) -> list[tuple[int, int]]:
    query = grammars.comment_query(language)
    spans = [(n.start_byte, n.end_byte) for _, n in grammars.captures(language, tree.root_node, query)]
    if language == "python":
        spans += [(n.start_byte, n.end_byte) for _, n in grammars.captures(language, tree.root_node, _DOCSTRINGS)]
    return spans


def _syntax_comment_spans(language: str, data: bytes) -> list[tuple[int, int]]:
    """Comment byte spans from the comment syntax of the language table (no grammar)."""
    lang = BY_NAME[language]
    spans = []
    for opening, closing in lang.block_comments:
        o, c = opening.encode(), closing.encode()
        start = data.find(o)
        while start >= 0:
            end = data.find(c, start + len(o))
            end = len(data) if end < 0 else end + len(c)
            spans.append((start, end))
            start = data.find(o, end)
    if lang.line_comments:
        prefixes = tuple(p.encode() for p in lang.line_comments)
        offset = 0
        for line in data.split(b"\n"):
            stripped = line.lstrip()
            if stripped.startswith(prefixes):
                spans.append((offset + len(line) - len(stripped), offset + len(line)))
            offset += len(line) + 1
    return spans


def analyse(language: str, text: str) -> CodeMetrics:
    """The metrics of `text`, a file in `language` (a name of the language table)."""
    data = text.encode("utf-8")
    errors = None
    if language in GRAMMAR_LANGUAGES:
        tree = grammars.parse(language, text)
        spans = _ast_comment_spans(language, tree)
        errors = len(grammars.captures(language, tree.root_node, _ERRORS)) if tree.root_node.has_error else 0
    else:
        spans = _syntax_comment_spans(language, data)
    code = bytearray(data)
    comment_chars = 0
    covered = -1
    for start, end in sorted(spans):
        start = max(start, covered)
        if end > start:
            comment_chars += len(_SPACE.sub(b"", data[start:end]))
            code[start:end] = _NOT_NEWLINE.sub(b" ", data[start:end])
            covered = end
    total = len(_SPACE.sub(b"", data))
    lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    eloc = sum(1 for line in bytes(code).split(b"\n") if line.strip())
    return CodeMetrics(comment_ratio=round(comment_chars / total, 6) if total else 0.0, eloc=eloc, lines=lines,
                       syntax_errors=errors)
