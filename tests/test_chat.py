"""The Ling chat template: literal renderings, the assistant-only loss mask, bad conversations."""

from __future__ import annotations

import numpy as np
import pytest
from post_training_helpers import EOT, ROLE_TOKENS, char_tokenizer_json

import ling_jax
from ling_jax.data.chat import (
    ChatFormatError,
    ChatTemplate,
    Message,
    Role,
    conversation_from_record,
    parse_messages,
    preference_from_record,
)

S, U, A = Role.SYSTEM, Role.USER, Role.ASSISTANT
MULTI = [Message(S, "Be brief."), Message(U, "Hi"), Message(A, "Hello!"), Message(U, "2+2?"), Message(A, "4")]


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    return ling_jax.load_tokenizer(char_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    texts = [f"user says hello {i} and the assistant answers politely, number {i * 7}" for i in range(200)]
    path = tmp_path_factory.mktemp("sp") / "chat.model"
    return ling_jax.train_sentencepiece(texts, path, 320, user_defined_symbols=[*ROLE_TOKENS, EOT])


def test_render_literal_strings():
    t = ChatTemplate()
    assert t.render([Message(U, "Hi"), Message(A, "Hello!")]) == (
        "<role>HUMAN</role>Hi<role>ASSISTANT</role>Hello!<|endoftext|>")
    assert t.render(MULTI) == ("<role>SYSTEM</role>Be brief.<role>HUMAN</role>Hi<role>ASSISTANT</role>Hello!"
                               "<|endoftext|><role>HUMAN</role>2+2?<role>ASSISTANT</role>4<|endoftext|>")
    assert t.render(MULTI[:4], generation_prompt=True) == (
        "<role>SYSTEM</role>Be brief.<role>HUMAN</role>Hi<role>ASSISTANT</role>Hello!<|endoftext|>"
        "<role>HUMAN</role>2+2?<role>ASSISTANT</role>")
    assert ChatTemplate(default_system="You are Ling.").render([Message(U, "Hi")], generation_prompt=True) == (
        "<role>SYSTEM</role>You are Ling.<role>HUMAN</role>Hi<role>ASSISTANT</role>")
    custom = ChatTemplate(system_prefix="[S]", user_prefix="[U]", assistant_prefix="[A]", end_of_text="</s>")
    assert custom.render(MULTI) == "[S]Be brief.[U]Hi[A]Hello!</s>[U]2+2?[A]4</s>"
    text, spans = t.render_spans(MULTI)
    assert [text[a:b] for a, b in spans] == ["Hello!<|endoftext|>", "4<|endoftext|>"]
    text, spans = t.render_spans(MULTI, loss_from=3)
    assert [text[a:b] for a, b in spans] == ["4<|endoftext|>"]


@pytest.mark.parametrize("which", ["hf", "sp"])
def test_loss_mask_is_exactly_the_assistant_spans(which, hf_tok, sp_tok):
    tok = hf_tok if which == "hf" else sp_tok
    ids, mask = ChatTemplate().encode(tok, MULTI)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    eot = tok.token_to_id(EOT)
    # Exactly two masked runs, each ending with the end-of-text token, holding the replies.
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    assert len(runs) == 4
    replies = [ids[a:b] for a, b in zip(runs[::2], runs[1::2], strict=True)]
    assert [int(r[-1]) for r in replies] == [eot, eot]
    decode = lambda x: tok.decode(x, skip_special_tokens=False).strip()  # noqa: E731
    assert [decode(r) for r in replies] == ["Hello!<|endoftext|>", "4<|endoftext|>"]
    # Everything else is the prompt: role strings, system and user text; the whole thing is one encode.
    assert decode(ids[~mask]).replace(" ", "") == (
        "<role>SYSTEM</role>Be brief.<role>HUMAN</role>Hi<role>ASSISTANT</role>"
        "<role>HUMAN</role>2+2?<role>ASSISTANT</role>").replace(" ", "")
    assert list(ids) == tok.encode(ChatTemplate().render(MULTI))
    # With loss_from, only the later replies count.
    _, later = ChatTemplate().encode(tok, MULTI, loss_from=3)
    assert later.sum() == len(replies[1]) and later[-len(replies[1]):].all()


def test_hf_mask_positions_literal(hf_tok):
    ids, mask = ChatTemplate().encode(hf_tok, [Message(U, "Hi"), Message(A, "Yo")])
    assert [hf_tok.id_to_token(int(i)) for i in ids] == [
        "<role>HUMAN</role>", "H", "i", "<role>ASSISTANT</role>", "Y", "o", "<|endoftext|>"]
    assert mask.tolist() == [False, False, False, False, True, True, True]


def test_prompt_ids_end_with_assistant_prefix(hf_tok):
    ids = ChatTemplate().prompt_ids(hf_tok, [Message(U, "Hi")])
    assert [hf_tok.id_to_token(i) for i in ids] == ["<role>HUMAN</role>", "H", "i", "<role>ASSISTANT</role>"]
    with pytest.raises(ChatFormatError, match=r"must end with a user turn"):
        ChatTemplate().prompt_ids(hf_tok, [Message(U, "Hi"), Message(A, "Yo")])


def test_records():
    assert conversation_from_record({"prompt": "p", "response": "r", "system": "s"}, "x") == [
        Message(S, "s"), Message(U, "p"), Message(A, "r")]
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert conversation_from_record({"messages": msgs}, "x") == [Message(U, "a"), Message(A, "b")]
    prompt, chosen, rejected = preference_from_record({"prompt": "q", "chosen": "good", "rejected": "bad"}, "x")
    assert (prompt, chosen, rejected) == ([Message(U, "q")], [Message(A, "good")], [Message(A, "bad")])


@pytest.mark.parametrize("record, match", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "ends with a user turn with no assistant reply"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "turn 1 is user"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "turn 0 is assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]}, "only come first"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"messages": []}, "non-empty list"),
    ({"text": "hello"}, "needs 'messages'"),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_bad_conversations(record, match):
    with pytest.raises(ChatFormatError, match=match):
        conversation_from_record(record, "data.jsonl line 3")
    with pytest.raises(ChatFormatError, match=r"data.jsonl line 3"):
        conversation_from_record(record, "data.jsonl line 3")


@pytest.mark.parametrize("record, match", [
    ({"prompt": "q", "chosen": "", "rejected": "bad"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": "good", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "q", "chosen": "good"}, "missing \\['rejected'\\]"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "g",
      "rejected": "b"}, "prompt.*must end with a user turn"),
    ({"prompt": "q", "chosen": [{"role": "human", "content": "g"}], "rejected": "b"}, "unknown role 'human'"),
])
def test_bad_preference_records(record, match):
    with pytest.raises(ChatFormatError, match=match):
        preference_from_record(record, "pairs.jsonl line 9")


def test_end_of_text_must_be_a_token(hf_tok):
    with pytest.raises(ChatFormatError, match=r"'</s>' is not a token.*data.chat.end_of_text"):
        ChatTemplate(end_of_text="</s>").encode(hf_tok, MULTI)
    with pytest.raises(ChatFormatError, match=r"unknown role"):
        parse_messages([{"role": "function", "content": "x"}], "here")
