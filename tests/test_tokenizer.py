"""Tests for ling_jax.data.tokenizer on tiny SentencePiece and `tokenizers` models trained on the fly."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ling_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    TokenizerKind,
    load_tokenizer,
)

CORPUS = [
    "def add(x, y): return x + y",
    "for i in range(10): print(i)",
    "class Foo(object): pass",
    "if x == 0: return None",
    "import numpy as np",
    "while True: break",
    "x = [i * 2 for i in range(n)]",
    'print("hello world")',
    "lambda a, b: a - b",
    "try: f() except ValueError: raise",
] * 10
TEXT = "def f(x): return [i for i in range(x)]"
SP_SPECIAL = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<|endoftext|>": 4}
HF_SPECIAL = ["<|endoftext|>", "<|startoftext|>", "<role>", "</role>", "[UNK]"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> pathlib.Path:
    prefix = tmp_path_factory.mktemp("sp") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(prefix),
        vocab_size=100,
        model_type="bpe",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        control_symbols=["<|endoftext|>"],
        user_defined_symbols=["<role>"],
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> pathlib.Path:
    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=HF_SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([tokenizers.AddedToken("<|fim_begin|>", special=False)])
    # A post-processor and padding that load_tokenizer must switch off.
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", special_tokens=[("<|startoftext|>", 1)]
    )
    tok.enable_padding(pad_id=0, pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def _write(path: pathlib.Path, data) -> None:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)


@pytest.fixture
def hf_dir(tmp_path, hf_json) -> pathlib.Path:
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    bos = {
        "content": "<|startoftext|>",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    _write(
        tmp_path / "tokenizer_config.json",
        {
            "bos_token": bos,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "[UNK]",
            "model_max_length": 4096,
        },
    )
    _write(
        tmp_path / "special_tokens_map.json",
        {"additional_special_tokens": ["<role>", "</role>", "<|fim_begin|>"]},
    )
    return tmp_path


# SentencePiece.
def test_sp_round_trip_and_ids(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.kind is TokenizerKind.SENTENCEPIECE
    assert tok.vocab_size == 100
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)
    ids = tok.encode(TEXT)
    assert 1 < len(ids) < len(TEXT) and all(4 < i < 100 for i in ids)
    assert tok.decode(ids) == TEXT
    assert tok.decode(np.asarray(ids, np.int32)) == TEXT


def test_sp_bos_eos_and_special_decode(sp_model):
    tok = load_tokenizer(sp_model)
    plain = tok.encode(TEXT)
    ids = tok.encode(TEXT, add_bos=True, add_eos=True)
    assert ids == [2, *plain, 3]
    assert tok.encode(TEXT, add_eos=True) == [*plain, 3]
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special_tokens=False) == f"<s>{TEXT}</s>"
    joined = tok.decode([*plain, 4, *plain], skip_special_tokens=False)
    assert joined == f"{TEXT}<|endoftext|> {TEXT}"  # The second run keeps its leading space.
    assert tok.special_tokens == SP_SPECIAL


def test_sp_tokens_and_unknown(sp_model):
    tok = load_tokenizer(sp_model)
    assert tok.token_to_id("<role>") == 5 and tok.id_to_token(5) == "<role>"
    assert tok.token_to_id("</s>") == 3
    assert tok.token_to_id("no-such-piece") is None
    assert tok.id_to_token(100) is None and tok.id_to_token(-1) is None
    assert 5 in tok.encode("<role>def")  # User-defined symbols are never split.
    assert tok.encode("€")[-1] == 1  # A character absent from the corpus is <unk>.


def test_sp_batch(sp_model):
    tok = load_tokenizer(sp_model)
    texts = ["import numpy as np", TEXT, ""]
    batch = tok.encode_batch(texts, add_bos=True)
    assert batch == [[2, *tok.encode(t)] for t in texts]
    assert len({len(row) for row in batch}) == 3 and batch[2] == [2]


def test_sp_directory_and_overrides(tmp_path, sp_model):
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    _write(tmp_path / "tokenizer_config.json", {"eos_token": "<|endoftext|>", "pad_token": None})
    tok = load_tokenizer(tmp_path, bos_id=7)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (7, 4, None)
    assert tok.encode("x", add_bos=True, add_eos=True)[:: len(tok.encode("x")) + 1] == [7, 4]
    assert tok.special_tokens[tok.id_to_token(7)] == 7


def test_home_relative_path(tmp_path, sp_model, monkeypatch):
    # `--config.data.tokenizer=~/...` reaches us unexpanded (the shell expands only a leading ~).
    shutil.copy(sp_model, tmp_path / "tok.model")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_tokenizer("~/tok.model").encode("x") == load_tokenizer(tmp_path / "tok.model").encode("x")


# Hugging Face tokenizer.json.
def test_hf_file_round_trip_without_post_processor_or_padding(hf_json):
    tok = load_tokenizer(hf_json)
    assert isinstance(tok, HFTokenizer) and tok.kind is TokenizerKind.HF
    assert tok.vocab_size == 301
    text = "def f(x):\n    return 'héllo ✓'  # ünïcode\n"
    ids = tok.encode(text)
    assert 1 not in ids and tok.decode(ids) == text  # Byte-level BPE round-trips any text.
    batch = tok.encode_batch(["x", TEXT])
    assert batch == [tok.encode("x"), tok.encode(TEXT)] and len(batch[0]) < len(batch[1])
    # The file alone declares no BOS / EOS; its padding config gives PAD.
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, 0)
    assert tok.special_tokens == {t: i for i, t in enumerate(HF_SPECIAL)}
    with pytest.raises(ValueError, match="no BOS token"):
        tok.encode(TEXT, add_bos=True)


def test_hf_directory_special_tokens(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 0)
    fim = tok.token_to_id("<|fim_begin|>")
    assert fim == 300 and tok.id_to_token(fim) == "<|fim_begin|>"
    assert tok.special_tokens == {**{t: i for i, t in enumerate(HF_SPECIAL)}, "<|fim_begin|>": 300}
    ids = tok.encode("<role>" + TEXT, add_bos=True, add_eos=True)
    assert ids[:2] == [1, 2] and ids[-1] == 0
    assert tok.decode(ids) == TEXT
    assert tok.decode(ids, skip_special_tokens=False) == f"<|startoftext|><role>{TEXT}<|endoftext|>"


def test_hf_directory_model_configs_and_precedence(tmp_path, hf_json):
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    _write(tmp_path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [3, 0]})
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 3, 0)
    _write(tmp_path / "config.json", {"eos_token_id": 2, "pad_token_id": 4, "hidden_size": 8})
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 4)
    _write(tmp_path / "tokenizer_config.json", {"bos_token": None, "eos_token": "</role>"})
    tok = load_tokenizer(tmp_path, pad_id=200)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 3, 200)


def test_hf_directory_ling_style_config(tmp_path, hf_json):
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    config = {
        "tokenizer_class": "BailingTokenizer",
        "add_bos_token": False,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "cls_token": "</role>",  # Further `*_token` keys become special tokens.
        "gmask_token": {"content": "<role>", "special": True},
        "added_tokens_decoder": {
            "300": {"content": "<|fim_begin|>", "special": True},
            "4": {"content": "[UNK]", "special": False},
        },
    }
    _write(tmp_path / "tokenizer_config.json", config)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 0)
    assert tok.special_tokens == {**{t: i for i, t in enumerate(HF_SPECIAL)}, "<|fim_begin|>": 300}
    assert (
        tok.decode([300, *tok.encode("x = 1")], skip_special_tokens=False) == "<|fim_begin|>x = 1"
    )


def test_unknown_extra_token_warns_and_override_bypasses_bad_role(tmp_path, hf_json):
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    config = {"bos_token": "<s>", "additional_special_tokens": ["<nope>", "<|fim_begin|>"]}
    _write(tmp_path / "tokenizer_config.json", config)
    with pytest.raises(TokenizerError, match="names bos token '<s>', not in"):
        load_tokenizer(tmp_path)
    with pytest.warns(UserWarning, match="special token '<nope>' not in"):
        tok = load_tokenizer(tmp_path, bos_id=1)
    assert tok.bos_id == 1 and "<nope>" not in tok.special_tokens
    assert tok.special_tokens["<|fim_begin|>"] == 300


def test_directory_prefers_tokenizer_json(tmp_path, hf_json, sp_model):
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    shutil.copy(sp_model, tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).kind is TokenizerKind.HF
    (tmp_path / "tokenizer.json").unlink()
    assert load_tokenizer(str(tmp_path)).kind is TokenizerKind.SENTENCEPIECE


# Errors.
def test_missing_path(tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(path))}.*expected a SentencePiece"
    ):
        load_tokenizer(path)


def test_directory_without_tokenizer(tmp_path):
    _write(tmp_path / "config.json", {})
    expected = f"no tokenizer.json or tokenizer.model in directory {re.escape(str(tmp_path))};"
    with pytest.raises(FileNotFoundError, match=expected):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("tok.model", "SentencePiece model"),
        ("tokenizer.json", "Hugging Face tokenizer.json"),
        ("vocab.txt", "neither a .model nor a .json"),
    ],
)
def test_corrupt_or_unknown_file(tmp_path, name, what):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage{")
    with pytest.raises(TokenizerError, match=what) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(("config", "match"), [
    ("{not json", "could not parse"),
    ('["a"]', "must hold a JSON object"),
    ({"eos_token": "<nope>"}, "tokenizer_config.json names eos token '<nope>', not in"),
    ({"bos_token": 5}, "bos_token must be a string"),
    ({"additional_special_tokens": "<role>"}, "additional_special_tokens must be a list"),
])  # fmt: skip
def test_bad_tokenizer_config(tmp_path, hf_json, config, match):
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    _write(tmp_path / "tokenizer_config.json", config)
    with pytest.raises(TokenizerError, match=match) as info:
        load_tokenizer(tmp_path)
    assert "tokenizer_config.json" in str(info.value)


def test_bad_ids(tmp_path, hf_json, sp_model):
    with pytest.raises(TokenizerError, match=r"keyword arguments gives eos token id 100, outside"):
        load_tokenizer(sp_model, eos_id=100)
    shutil.copy(hf_json, tmp_path / "tokenizer.json")
    _write(tmp_path / "config.json", {"pad_token_id": 126081})
    with pytest.raises(TokenizerError, match=r"config.json gives pad token id 126081"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(sp_model)
    with pytest.raises(ValueError, match=r"token ids \[100, -1\] are outside"):
        tok.decode([5, 100, -1])
    with pytest.raises(TypeError, match="use encode for one string"):
        tok.encode_batch("abc")


def test_token_bytes_count_the_text_bytes(sp_model, hf_json):
    text = "def add(x, y): return x + y"  # no character outside the fixtures' vocabularies (<unk> counts 0)
    hf = load_tokenizer(hf_json)
    table = hf.token_bytes()
    assert sum(table[i] for i in hf.encode(text)) == len(text.encode())
    assert all(table[i] == 0 for i in hf.special_tokens.values())
    sp = load_tokenizer(sp_model)
    table = sp.token_bytes()
    # At most SentencePiece's dummy prefix more: a first piece "▁..." counts a space the text does not have.
    ids = sp.encode(text)
    dummy = int(sp.id_to_token(ids[0]).startswith("\u2581"))
    assert sum(table[i] for i in ids) == len(text.encode()) + dummy
    assert table[sp.bos_id] == table[sp.eos_id] == 0
