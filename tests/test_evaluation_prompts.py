"""Prompts: plain, chat, FIM in the training layout (PSM / SPM), truncation to the model's positions, replies."""

from __future__ import annotations

import pathlib

import pytest

from ling_jax.data.chat import ChatFormatError, ChatTemplate
from ling_jax.data.fim import LING_FIM_TOKENS, FimFormat, FimSentinels, layout
from ling_jax.data.tokenizer import train_sentencepiece
from ling_jax.evaluation.humaneval import humaneval, single_line_infilling
from ling_jax.evaluation.problems import Problem, TaskError
from ling_jax.evaluation.prompts import PromptBuilder, code_from_reply, defines

EOT = "<|endoftext|>"


def fim_tokenizer(path: pathlib.Path, *, fim: bool = True, vocab_size: int = 400):
    """A tiny SentencePiece tokenizer trained on HumanEval, with the FIM sentinels and the chat end of text."""
    texts = [p.prompt + p.reference for p in humaneval()]
    symbols = [*LING_FIM_TOKENS, EOT] if fim else [EOT]
    return train_sentencepiece(texts, path, vocab_size, user_defined_symbols=symbols)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fim_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model")


def test_completion_prompt_and_left_truncation(tok):
    builder = PromptBuilder(tok)
    p = humaneval()[0]
    full, dropped = builder.ids(p, 10_000)
    assert dropped == 0 and full == [tok.bos_id] + tok.encode(p.prompt)
    cut, dropped = builder.ids(p, 50)
    assert len(cut) == 50 and dropped == len(full) - 50
    assert cut[0] == tok.bos_id and cut[1:] == full[-49:]  # BOS stays, the oldest tokens go


@pytest.mark.parametrize("fmt", list(FimFormat))
def test_infilling_prompt_is_the_training_layout(tok, fmt):
    builder = PromptBuilder(tok, fmt)
    p = single_line_infilling()[3]
    ids, dropped = builder.ids(p, 10_000)
    sentinels = FimSentinels.from_tokenizer(tok)
    assert dropped == 0
    assert ids == [tok.bos_id] + layout(tok.encode(p.prompt), [], tok.encode(p.suffix), fmt, sentinels)
    assert ids[-1] == sentinels.middle_id if fmt is FimFormat.PSM else ids[-1] != sentinels.middle_id
    short, dropped = builder.ids(p, 60)
    assert len(short) == 60 and dropped == len(ids) - 60
    pre, suf = tok.encode(p.prompt), tok.encode(p.suffix)
    if fmt is FimFormat.PSM:  # the text nearest the hole stays: the prefix's tail, the suffix's head
        body = short[2:]
        cut_pre = body[: body.index(sentinels.suffix_id)]
        cut_suf = body[body.index(sentinels.suffix_id) + 1: -1]
        assert cut_pre == pre[len(pre) - len(cut_pre):] and cut_suf == suf[: len(cut_suf)]
        assert len(pre) - len(cut_pre) >= (dropped + 1) // 2 - 1


def test_infilling_needs_the_sentinels_and_no_chat(tmp_path, tok):
    plain = fim_tokenizer(tmp_path / "plain.model", fim=False)
    infill = single_line_infilling()[:1]
    with pytest.raises(TaskError, match="FIM sentinels"):
        PromptBuilder(plain).check(infill)
    with pytest.raises(TaskError, match="without --chat"):
        PromptBuilder(tok, chat=ChatTemplate()).check(infill)
    PromptBuilder(tok).check(infill)


def test_chat_prompt_and_replies(tok, tmp_path):
    builder = PromptBuilder(tok, chat=ChatTemplate())
    p = humaneval()[2]
    ids, _ = builder.ids(p, 10_000)
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.rstrip().endswith("<role>ASSISTANT</role>") and "Complete the following Python function" in text
    assert builder.stop_id() == tok.token_to_id(EOT)
    reply = "Sure:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    code, alone = builder.completion(p, reply)
    assert alone and code == "def truncate_number(number: float) -> float:\n    return number % 1.0\n"
    assert builder.completion(p, "    return number % 1.0\n") == ("    return number % 1.0\n", False)
    assert code_from_reply("```\nx = 1\n") == "x = 1\n"  # an unclosed fence runs to the end
    assert defines("  def f (x):", "f") and not defines("def ff(x):", "f") and defines("anything", None)
    no_eot = train_sentencepiece(["def f(): pass"] * 20, tmp_path / "no_eot.model", 280)
    with pytest.raises(ChatFormatError, match="end-of-text"):
        PromptBuilder(no_eot, chat=ChatTemplate()).check([Problem("t", "x", "p", "")])


def test_decode_stops_at_eos_and_skips_ids_past_the_vocabulary(tok):
    builder = PromptBuilder(tok)
    ids = tok.encode("return x")
    assert builder.decode(ids + [tok.vocab_size + 5] + [tok.eos_id] + tok.encode(" junk")) == tok.decode(ids)


def test_generation_config_stop_ids_also_end_a_reply(tok):
    eot = tok.token_to_id(EOT)
    builder = PromptBuilder(tok, extra_stop_ids=(eot, tok.eos_id))
    assert builder.stop_ids() == (tok.eos_id, eot)  # EOS first, no repeats
    ids = tok.encode("return x")
    assert builder.decode(ids + [eot] + tok.encode(" junk") + [tok.eos_id]) == tok.decode(ids)
    assert PromptBuilder(tok).stop_ids() == (tok.eos_id,)
