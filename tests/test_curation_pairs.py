"""ling_jax.curation.pairs: code-comment pairs from the AST and the paper's seven rules."""

from __future__ import annotations

import pytest

from ling_jax.curation.pairs import PairSettings, check_pair, clean_comment, extract_pairs, file_pairs
from ling_jax.curation.records import Reason, record

DOC = "Return the sum of the two numbers given as arguments."
CODE = "def add(a, b):\n    return a + b\n"


def test_pairs_come_from_docstrings_and_leading_comments():
    py = f'import os\n\n\ndef add(a, b):\n    """{DOC}"""\n    return a + b\n\n\ndef bare(x):\n    return x\n'
    (pair,) = extract_pairs("python", py)
    assert pair[0].startswith("def add(a, b):") and pair[1] == DOC
    java = f"class A {{\n    /**\n     * {DOC}\n     */\n    int add(int a, int b) {{ return a + b; }}\n}}\n"
    assert extract_pairs("java", java) == [("int add(int a, int b) { return a + b; }", DOC)]
    go = f"package m\n\n// {DOC}\n// Second line.\nfunc Add(a, b int) int {{ return a + b }}\n"
    assert extract_pairs("go", go) == [("func Add(a, b int) int { return a + b }", DOC + "\nSecond line.")]
    rust = f"/// {DOC}\nfn add(a: i32, b: i32) -> i32 {{ a + b }}\n"
    assert extract_pairs("rust", rust) == [("fn add(a: i32, b: i32) -> i32 { a + b }", DOC)]
    far = f"// {DOC}\n\n\nfunction add(a, b) {{ return a + b; }}\n"  # a blank gap: not its comment
    assert extract_pairs("javascript", far) == []
    assert extract_pairs("markdown", "# title\n") == []
    assert clean_comment("  # hello") == "hello" and clean_comment("/* x */") == "x"


@pytest.mark.parametrize("code,comment,reason", [
    (CODE, DOC, None),
    ("f()", DOC, Reason.PAIR_CODE_LENGTH),
    ("x" * 100_001, DOC, Reason.PAIR_CODE_LENGTH),
    ("def f():\n" + "    x = 1\n" * 100, DOC, Reason.PAIR_CODE_LINES),
    (CODE, "", Reason.PAIR_COMMENT_LENGTH),
    (CODE, "Adds.", Reason.PAIR_COMMENT_LENGTH),
    (CODE, "=" * 25 + " a b c d e " + "-" * 25, Reason.PAIR_SPECIAL_CHARACTERS),
    (CODE, "TODO: write a better docstring for this function", Reason.PAIR_ANNOTATION),
    (CODE, "Adds the numbers. FIXME: overflows on large input", Reason.PAIR_ANNOTATION),
    (CODE, "Adds the numbers; BUG: wrong for negative values", Reason.PAIR_ANNOTATION),
])
def test_pair_rules(code, comment, reason):
    assert check_pair(code, comment, PairSettings()) is reason


def test_file_pairs_carry_metadata_and_md5_key():
    rec = record("o/r", "m.py", f'def add(a, b):\n    """{DOC}"""\n    return a + b\n', language="python", stars=3)
    ((key, pair),) = list(file_pairs(rec, PairSettings()))
    assert len(key) == 32 and pair["kind"] == "pair" and pair["comment"] == DOC
    assert pair["id"] == "o/r/m.py#0" and pair["stars"] == 3 and pair["text"] == DOC + "\n" + pair["code"]
