"""Tests of ling_jax.data.fim: the PSM / SPM layouts, their inverse, determinism and sentinel lookup."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import sentencepiece as spm

from ling_jax.data import fim
from ling_jax.data.tokenizer import load_tokenizer, train_sentencepiece

WORDS = ["def", "return", "import", "class", "self", "print", "for", "in", "range", "if", "else", "x", "y",
         "foo", "bar", "=", "(", ")", ":", "+", "1", "2", "é", "中文", "\n", "    ", "\t"]


def random_code(rng: random.Random, n_words: int) -> str:
    """A code-like text over a small alphabet (so a tiny SentencePiece model covers it)."""
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tiny lossless SentencePiece model with the Ling FIM sentinels."""
    rng = random.Random(0)
    lines = [random_code(rng, 30) for _ in range(300)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=120, minloglevel=2,
        user_defined_symbols=list(fim.LING_FIM_TOKENS), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, character_coverage=1.0, hard_vocab_limit=False,
    )
    path = tmp_path_factory.mktemp("fim_tok") / "tok.model"
    path.write_bytes(model.getvalue())
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def sentinels(tok):
    return fim.FimSentinels.from_tokenizer(tok)


def test_split_text_covers_text():
    rng = np.random.default_rng(0)
    for n in [0, 1, 2, 10, 100]:
        text = "".join(chr(97 + i % 26) for i in range(n))
        for _ in range(20):
            prefix, middle, suffix = fim.split_text(text, rng)
            assert prefix + middle + suffix == text


@pytest.mark.parametrize("fmt", list(fim.FimFormat))
def test_layout(fmt, sentinels):
    p, m, s = [10, 11], [20], [30, 31, 32]
    ids = fim.layout(p, m, s, fmt, sentinels)
    pre, mid, suf = sentinels.prefix_id, sentinels.middle_id, sentinels.suffix_id
    if fmt is fim.FimFormat.PSM:
        assert ids == [pre, 10, 11, suf, 30, 31, 32, mid, 20]
    else:
        assert ids == [pre, suf, 30, 31, 32, mid, 10, 11, 20]
    assert fim.reassemble(ids, sentinels) == p + m + s
    assert fim.format_of(ids, sentinels) is fmt


@pytest.mark.parametrize("spm_rate, fmt", [(0.0, fim.FimFormat.PSM), (1.0, fim.FimFormat.SPM)])
def test_fim_reassembles_to_the_original_document(tok, sentinels, spm_rate, fmt):
    rng_text = random.Random(1)
    for i in range(60):
        text = random_code(rng_text, rng_text.randrange(1, 40))
        assert tok.decode(tok.encode(text)) == text  # The tokenizer itself is lossless.
        ids, used = fim.apply_fim(text, np.random.default_rng(i), encode=tok.encode, sentinels=sentinels,
                                  fim_rate=1.0, spm_rate=spm_rate)
        assert used is fmt
        assert ids[0] == sentinels.prefix_id
        for sentinel in (sentinels.prefix_id, sentinels.middle_id, sentinels.suffix_id):
            assert ids.count(sentinel) == 1
        if fmt is fim.FimFormat.SPM:
            assert ids[1] == sentinels.suffix_id
        assert tok.decode(fim.reassemble(ids, sentinels)) == text


def test_fim_rate_and_determinism(tok, sentinels):
    text = "def foo(x):\n    return x + 1\n"
    kwargs = dict(encode=tok.encode, sentinels=sentinels)
    plain, used = fim.apply_fim(text, np.random.default_rng(0), fim_rate=0.0, spm_rate=0.5, **kwargs)
    assert used is None and plain == tok.encode(text)
    assert fim.reassemble(plain, sentinels) == plain and fim.format_of(plain, sentinels) is None
    runs = [fim.apply_fim(text, np.random.default_rng(7), fim_rate=0.5, spm_rate=0.5, **kwargs) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    formats = [fim.apply_fim(text, np.random.default_rng(s), fim_rate=0.5, spm_rate=0.5, **kwargs)[1]
               for s in range(400)]
    n_fim = sum(f is not None for f in formats)
    n_spm = sum(f is fim.FimFormat.SPM for f in formats)
    assert 150 < n_fim < 250 and 0.3 < n_spm / n_fim < 0.7


def test_empty_pieces(sentinels):
    encode = lambda s: [ord(c) for c in s]  # noqa: E731  A lossless toy tokenizer.
    for seed in range(50):
        ids, fmt = fim.apply_fim("ab", np.random.default_rng(seed), encode=encode, sentinels=sentinels,
                                 fim_rate=1.0, spm_rate=0.5)
        assert fmt is not None
        assert "".join(map(chr, fim.reassemble(ids, sentinels))) == "ab"
    ids, _ = fim.apply_fim("", np.random.default_rng(0), encode=encode, sentinels=sentinels, fim_rate=1.0, spm_rate=0.0)
    assert ids == [sentinels.prefix_id, sentinels.suffix_id, sentinels.middle_id]
    assert fim.reassemble(ids, sentinels) == []


def test_reassemble_rejects_broken_layout(sentinels):
    with pytest.raises(ValueError, match="suffix / middle"):
        fim.reassemble([sentinels.prefix_id, 5, 6], sentinels)


def test_missing_sentinel_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"'<\|fim_pad\|>' is not a token of .*fim_rate=0"):
        fim.FimSentinels.from_tokenizer(tok, suffix_token="<|fim_pad|>")
    with pytest.raises(ValueError, match="distinct"):
        fim.FimSentinels.from_tokenizer(tok, "<|fim_prefix|>", "<|fim_prefix|>", "<|fim_suffix|>")


def test_document_encoder(tok):
    text = "def foo(x):\n    return x + 1\n"
    enc = fim.DocumentEncoder(tok, seed=3, fim_rate=1.0, spm_rate=0.5, add_bos=True, add_eos=True)
    sentinels = fim.FimSentinels.from_tokenizer(tok)
    ids = enc(text, epoch=0, index=7)
    assert ids[0] == tok.bos_id and ids[1] == sentinels.prefix_id and ids[-1] == tok.eos_id
    assert tok.decode(fim.reassemble(ids[1:-1], sentinels)) == text
    assert ids == enc(text, epoch=0, index=7)  # Deterministic per (seed, epoch, index) ...
    others = [enc(text, epoch=e, index=i) for e, i in [(1, 7), (0, 8), (2, 7), (0, 9)]]
    assert any(o != ids for o in others)  # ... and not the same split everywhere.
    plain = fim.DocumentEncoder(tok, seed=3)
    assert plain(text, epoch=0, index=7) == tok.encode(text)
    with pytest.raises(ValueError, match=r"fim_rate=1\.5"):
        fim.DocumentEncoder(tok, seed=0, fim_rate=1.5)
    with pytest.raises(ValueError, match="not a token"):
        fim.DocumentEncoder(tok, seed=0, fim_rate=0.5, sentinel_tokens=("<a>", "<b>", "<c>"))


def test_trained_tokenizer_encodes_fim_pieces_without_a_spurious_space(tmp_path):
    """`train_sentencepiece` adds no dummy prefix: a FIM middle starting with indentation keeps its width."""
    corpus = ["def area(w, h):\n    return w * h\n"] * 50
    tok = fim.DocumentEncoder(
        train_sentencepiece(corpus, tmp_path / "t.model", 280, user_defined_symbols=fim.LING_FIM_TOKENS),
        seed=0, fim_rate=1.0).tokenizer
    assert fim.splits_losslessly(tok)
    prefix, middle = "def area(w, h):\n", "    return w * h\n"
    assert tok.decode(tok.encode(prefix) + tok.encode(middle)) == prefix + middle
    assert tok.decode(tok.encode(middle)) == middle


def test_encoder_warns_about_a_dummy_prefix_tokenizer(tmp_path):
    rng = random.Random(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([random_code(rng, 30) for _ in range(300)]), model_writer=model, vocab_size=120,
        minloglevel=2, user_defined_symbols=list(fim.LING_FIM_TOKENS), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, character_coverage=1.0, hard_vocab_limit=False)
    (tmp_path / "dummy.model").write_bytes(model.getvalue())
    tok = load_tokenizer(tmp_path / "dummy.model")
    assert not fim.splits_losslessly(tok)
    assert tok.decode(tok.encode("a") + tok.encode("b")) == "a b"  # the space FIM pieces would gain
    with pytest.warns(UserWarning, match=r"dummy-prefix space\): every FIM middle and suffix"):
        fim.DocumentEncoder(tok, seed=0, fim_rate=0.5)
