"""The tree-sitter grammars of the 16 analysed languages, from the installed per-language wheels.

Every grammar ships compiled in its `tree-sitter-<lang>` wheel (pinned in setup.cfg); nothing is
downloaded or built at run time. `parse(language, text)` returns the tree; `captures(language, tree, query)`
runs a tree-sitter query (in C) and returns the captured nodes in source order. Parsers and compiled
queries are cached per process (Beam workers each build their own).
"""

from __future__ import annotations

import functools
import importlib

import tree_sitter

from ling_jax.curation.languages import GRAMMAR_LANGUAGES

# language -> (module, function returning the grammar). TypeScript uses the TSX grammar (a superset).
_MODULES = {
    "python": ("tree_sitter_python", "language"), "java": ("tree_sitter_java", "language"),
    "javascript": ("tree_sitter_javascript", "language"), "typescript": ("tree_sitter_typescript", "language_tsx"),
    "c": ("tree_sitter_c", "language"), "cpp": ("tree_sitter_cpp", "language"),
    "csharp": ("tree_sitter_c_sharp", "language"), "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"), "php": ("tree_sitter_php", "language_php"),
    "ruby": ("tree_sitter_ruby", "language"), "kotlin": ("tree_sitter_kotlin", "language"),
    "scala": ("tree_sitter_scala", "language"), "swift": ("tree_sitter_swift", "language"),
    "shell": ("tree_sitter_bash", "language"), "lua": ("tree_sitter_lua", "language"),
}
assert set(_MODULES) == set(GRAMMAR_LANGUAGES)

# Node types that are comments, per grammar (those the grammar has).
_COMMENT_TYPES = ("comment", "line_comment", "block_comment", "multiline_comment", "html_comment")


@functools.cache
def language(name: str) -> tree_sitter.Language:
    """The compiled grammar of `name` (one of `GRAMMAR_LANGUAGES`)."""
    module, function = _MODULES[name]
    return tree_sitter.Language(getattr(importlib.import_module(module), function)())


@functools.cache
def _parser(name: str) -> tree_sitter.Parser:
    return tree_sitter.Parser(language(name))


def parse(name: str, text: str) -> tree_sitter.Tree:
    """The syntax tree of `text` in language `name`."""
    return _parser(name).parse(text.encode("utf-8"))


def has_node_type(name: str, node_type: str) -> bool:
    """Whether the grammar of `name` has a named node type `node_type`."""
    return language(name).id_for_node_kind(node_type, True) is not None


@functools.cache
def _query(name: str, source: str) -> tree_sitter.Query:
    return tree_sitter.Query(language(name), source)


def captures(name: str, node: tree_sitter.Node, source: str) -> list[tuple[str, tree_sitter.Node]]:
    """`(capture name, node)` of every match of the query `source` under `node`, in source order."""
    found = tree_sitter.QueryCursor(_query(name, source)).captures(node)
    pairs = [(cap, n) for cap, nodes in found.items() for n in nodes]
    return sorted(pairs, key=lambda p: (p[1].start_byte, -p[1].end_byte, p[0]))


@functools.cache
def comment_query(name: str) -> str:
    """A query capturing every comment node of language `name` as `@c`."""
    return " ".join(f"({t}) @c" for t in _COMMENT_TYPES if has_node_type(name, t))


def text_of(node: tree_sitter.Node) -> str:
    """The source text of `node`."""
    return node.text.decode("utf-8", errors="replace")
