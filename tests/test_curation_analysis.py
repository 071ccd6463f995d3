"""ling_jax.curation.analysis and grammars: comment ratio, effective lines, syntax checks in 16 languages."""

from __future__ import annotations

import pytest

from ling_jax.curation.analysis import analyse
from ling_jax.curation.languages import GRAMMAR_LANGUAGES
from ling_jax.curation.stages import MetricsSettings, metrics_check

# language -> (a valid file with one comment line, the same file broken).
SNIPPETS = {
    "python": ("# add\ndef f(a):\n    return a + 1\n", "def f(a:\n    return a +\n"),
    "java": ("// add\nclass A { int f(int a) { return a + 1; } }\n", "class A { int f(int a) { return a + ; }\n"),
    "javascript": ("// add\nfunction f(a) { return a + 1; }\n", "function f(a) { return a + ; \n"),
    "typescript": ("// add\nfunction f(a: number): number { return a + 1; }\n", "function f(a: number { return a }\n"),
    "c": ("// add\nint f(int a) { return a + 1; }\n", "int f(int a) { return a + ; \n"),
    "cpp": ("// add\nint f(int a) { return a + 1; }\n", "int f(int a) { return a + ; \n"),
    "csharp": ("// add\nclass A { int F(int a) { return a + 1; } }\n", "class A { int F(int a) { return a + ; }\n"),
    "go": ("// add\npackage m\nfunc f(a int) int { return a + 1 }\n", "package m\nfunc f(a int) int { return a + \n"),
    "rust": ("// add\nfn f(a: i32) -> i32 { a + 1 }\n", "fn f(a: i32) -> i32 { a + \n"),
    "php": ("<?php\n// add\nfunction f($a) { return $a + 1; }\n", "<?php\nfunction f($a) { return $a + ; \n"),
    "ruby": ("# add\ndef f(a)\n  a + 1\nend\n", "def f(a)\n  a +\n"),
    "kotlin": ("// add\nfun f(a: Int): Int { return a + 1 }\n", "fun f(a: Int): Int { return a + \n"),
    "scala": ("// add\nobject A { def f(a: Int): Int = a + 1 }\n", "object A { def f(a: Int): Int = a + \n"),
    "swift": ("// add\nfunc f(a: Int) -> Int { return a + 1 }\n", "func f(a: Int) -> Int { return a + \n"),
    "shell": ("# add\nf() {\n  echo $1\n}\n", "f() {\n  echo $1\n"),
    "lua": ("-- add\nfunction f(a) return a + 1 end\n", "function f(a) return a + \n"),
}


def test_every_grammar_language_has_a_snippet():
    assert set(SNIPPETS) == set(GRAMMAR_LANGUAGES)


@pytest.mark.parametrize("language", sorted(SNIPPETS))
def test_syntax_check_comments_and_eloc(language):
    good, bad = SNIPPETS[language]
    m = analyse(language, good)
    assert m.syntax_errors == 0
    assert m.eloc == len([line for line in good.splitlines() if line.strip()]) - 1  # all but the comment line
    comment = next(line for line in good.splitlines() if "add" in line).strip()
    nonblank = len("".join(good.split()))
    assert m.comment_ratio == pytest.approx(len("".join(comment.split())) / nonblank, abs=1e-6)
    assert analyse(language, bad).syntax_errors > 0


def test_python_docstrings_count_as_comments_and_other_languages_use_their_syntax():
    m = analyse("python", '"""Doc."""\nx = 1\n')
    assert m.comment_ratio == pytest.approx(len('"""Doc."""') / len('"""Doc."""x=1'), abs=1e-6)
    assert m.eloc == 1 and m.lines == 2
    h = analyse("haskell", "-- note\nmain = print 1\n{- block\n comment -}\n")
    assert h.syntax_errors is None and h.eloc == 1
    assert h.comment_ratio == pytest.approx(len("--note{-blockcomment-}") / len("--notemain=print1{-blockcomment-}"))


def test_metrics_filters():
    ok = {"comment_ratio": 0.2, "eloc": 10, "syntax_errors": 0}
    s = MetricsSettings()
    assert metrics_check({"metrics": ok}, s) is None
    assert metrics_check({"metrics": {**ok, "syntax_errors": 2}}, s).value == "syntax_error"
    assert metrics_check({"metrics": {**ok, "syntax_errors": 2}}, MetricsSettings(max_syntax_errors=-1)) is None
    assert metrics_check({"metrics": {**ok, "syntax_errors": None}}, s) is None  # no grammar: not checked
    assert metrics_check({"metrics": {**ok, "eloc": 0}}, s).value == "eloc"
    assert metrics_check({"metrics": {**ok, "comment_ratio": 0.95}}, s).value == "comment_ratio"
    assert metrics_check({"metrics": ok}, MetricsSettings(min_comment_ratio=0.3)).value == "comment_ratio"
