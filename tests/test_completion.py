"""FIM code completion (`ling_jax.complete`, `--fim` on the generate command) with a model trained by train.py."""

from __future__ import annotations

import os
import sys

import pytest
from train_helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from ling_jax.cli import generate as generate_cli  # noqa: E402
from ling_jax.data.fim import FimSentinels  # noqa: E402
from ling_jax.inference.completion import fim_prompt  # noqa: E402
from ling_jax.inference.decoding import GenerationError  # noqa: E402

DOC = "def area(w, h):\n    return w * h\n\n\nprint(area(3, 4))\n"
PREFIX, MIDDLE, SUFFIX = "def area(w, h):\n", "    return w * h\n", "\n\nprint(area(3, 4))\n"
assert PREFIX + MIDDLE + SUFFIX == DOC


@pytest.fixture(scope="module")
def fim_run(tmp_path_factory):
    """A tiny model trained with FIM (PSM only) on one repeated document, and its workdir."""
    root = tmp_path_factory.mktemp("fim")
    src = root / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}.py").write_text(DOC)
    c = tiny_config(steps=500, checkpoint_every=500, eval_every=0, log_every=100)
    c.data.kind, c.data.path, c.data.eval_fraction = "text_dir", str(src), 0.0
    c.data.fim_rate, c.data.fim_spm_rate, c.data.add_eos = 1.0, 0.0, True
    c.tokenizer_vocab_size = 300
    c.model_overrides.vocab_size = None
    c.model_overrides.update(dict(max_position_embeddings=128, hidden_size=128, intermediate_size=256,
                                  moe_intermediate_size=64, num_attention_heads=4, head_dim=32))
    c.seq_len, c.batch_size = 64, 8
    c.schedule.peak_value, c.schedule.warmup_steps, c.schedule.decay_steps = 5e-3, 20, 500
    c.loss.accumulation_steps = 1
    workdir = str(root / "run")
    train.run(c, workdir)
    return workdir


@pytest.mark.slow  # trains a model for 500 steps (about a minute)
def test_complete_fills_the_known_middle(fim_run):
    import ling_jax

    model, params = ling_jax.from_pretrained(fim_run)
    tokenizer = ling_jax.load_tokenizer(os.path.join(fim_run, "tokenizer.model"))
    assert ling_jax.complete(model, params, tokenizer, PREFIX, SUFFIX, max_new_tokens=24) == MIDDLE


@pytest.mark.slow
def test_cli_fim_mode_prints_the_middle(fim_run, tmp_path, capsys):
    (tmp_path / "pre.py").write_text(PREFIX)
    (tmp_path / "suf.py").write_text(SUFFIX)
    args = ["--model", fim_run, "--tokenizer", os.path.join(fim_run, "tokenizer.model"), "--fim", "--no-bos",
            "--prefix-file", str(tmp_path / "pre.py"), "--suffix-file", str(tmp_path / "suf.py"),
            "--max-new-tokens", "24", "--dtype", "float32"]
    assert generate_cli.main(args) == 0
    assert capsys.readouterr().out == f"[0] {MIDDLE}\n"


class _Vocab:
    """A tokenizer stand-in: characters as ids, with or without the FIM sentinels."""

    path, bos_id, eos_id = "toy-tokenizer", 1, 2

    def __init__(self, sentinels: bool):
        self.specials = {"<|fim_prefix|>": 3, "<|fim_middle|>": 4, "<|fim_suffix|>": 5} if sentinels else {}

    def token_to_id(self, token):
        return self.specials.get(token)

    def encode(self, text):
        return [10 + ord(ch) % 50 for ch in text]


def test_fim_prompt_layouts_with_the_tokenizer_sentinels():
    tok = _Vocab(sentinels=True)
    pre, suf = tok.encode("ab"), tok.encode("c")
    assert fim_prompt(tok, "ab", "c") == [3, *pre, 5, *suf, 4]
    assert fim_prompt(tok, "ab", "c", fim_format="spm", add_bos=True) == [1, 3, 5, *suf, 4, *pre]
    assert FimSentinels.from_tokenizer(tok) == FimSentinels(3, 4, 5)


def test_fim_without_sentinels_is_a_clear_error():
    with pytest.raises(GenerationError, match=r"FIM sentinels.*trained with"):
        fim_prompt(_Vocab(sentinels=False), "a", "b")


def test_fim_request_longer_than_the_context_is_a_clear_error():
    from ling_jax.inference.completion import check_fim_length

    check_fim_length(100, 28, 128)  # fits exactly
    with pytest.raises(GenerationError, match=r"prefix plus suffix is 101 tokens.*max_position_embeddings 128"):
        check_fim_length(101, 28, 128)


def test_cli_rejects_bad_fim_requests_before_loading(fixture_dir, tmp_path, capsys, monkeypatch):
    import ling_jax

    monkeypatch.setattr(generate_cli, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    (tmp_path / "p.py").write_text("x = 1\n" * 100)
    (tmp_path / "s.py").write_text("y = 2\n")
    corpus = ["x = 1", "y = 2", "def f(a): return a"] * 20
    plain = ling_jax.train_sentencepiece(corpus, tmp_path / "plain.model", 280)
    fim = ling_jax.train_sentencepiece(corpus, tmp_path / "fim.model", 280,
                                       user_defined_symbols=["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"])
    base = ["--model", str(fixture_dir), "--fim", "--prefix-file", str(tmp_path / "p.py"),
            "--suffix-file", str(tmp_path / "s.py")]
    assert generate_cli.main([*base, "--tokenizer", str(plain.path)]) == 2
    assert "FIM sentinels" in capsys.readouterr().err
    assert generate_cli.main([*base, "--tokenizer", str(fim.path), "--max-new-tokens", "100"]) == 2
    err = capsys.readouterr().err
    assert "prefix plus suffix is" in err and "max_position_embeddings" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["--model", str(fixture_dir), "--fim", "--prefix-file", str(tmp_path / "p.py")])
    assert e.value.code == 2
    assert "--fim takes --prefix-file and --suffix-file" in capsys.readouterr().err
