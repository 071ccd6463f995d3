"""SFT data: packed chat rows with assistant-only targets, truncation policies, counts, resume, bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from post_training_helpers import EOT, char_tokenizer_json, chat_records, write_jsonl

import ling_jax
from ling_jax.data.chat import ChatFormatError
from ling_jax.data.sft import Truncation, default_post_training_data_config, make_sft_iterator, truncate


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return ling_jax.load_tokenizer(char_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _cfg(path, **changes):
    c = default_post_training_data_config()
    c.path, c.eval_fraction = str(path), 0.0
    c.update(changes)
    return c


def _text(tok, ids):
    return "".join(tok.id_to_token(int(i)) for i in ids)


def test_batches_pack_conversations_with_assistant_targets(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(40))
    it = make_sft_iterator(_cfg(path, shuffle=False), tokenizer=tok, seq_len=160, batch_size=2, seed=0)
    batch = next(it)
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
    assert all(v.shape == (2, 160) and v.dtype == np.int32 for v in batch.values())
    eot = tok.token_to_id(EOT)
    for row in range(2):
        seg, inputs, targets = batch["segment_ids"][row], batch["inputs"][row], batch["targets"][row]
        assert seg.max() >= 2  # several conversations per row
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (batch["positions"][row, idx] == np.arange(len(idx))).all()
            conv = _text(tok, inputs[idx])
            # The targets of this segment, as text, are exactly its replies and their end-of-text tokens.
            kept = targets[idx][targets[idx] != -100]
            replies = [p.split(EOT)[0] + EOT for p in conv.split("<role>ASSISTANT</role>")[1:]]
            assert _text(tok, kept) == "".join(replies), conv
            assert kept[-1] == eot and targets[idx[-1]] == -100  # no target across conversations
        assert (targets[seg == 0] == -100).all()
    assert it.stats() == {"dropped_undecodable": 0, "dropped_malformed": 0, "dropped_empty": 0, "dropped_too_long": 0,
                          "dropped_no_loss": 0, "truncated": 0}


def test_truncate_policies():
    ids, mask = np.arange(10, dtype=np.int32), np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1], bool)
    out, m, count = truncate(ids, mask, 6, Truncation.TRUNCATE_RIGHT)
    assert out.tolist() == [0, 1, 2, 3, 4, 5] and m.tolist() == [0, 0, 0, 0, 1, 1] and count.name == "TRUNCATED"
    out, m, count = truncate(ids, mask, 6, Truncation.TRUNCATE_LEFT)
    assert out.tolist() == [4, 5, 6, 7, 8, 9] and count.name == "TRUNCATED"
    assert truncate(ids, mask, 6, Truncation.DROP)[2].name == "DROPPED_TOO_LONG"
    assert truncate(ids, mask, 4, Truncation.TRUNCATE_RIGHT)[2].name == "DROPPED_NO_LOSS"  # no reply left
    assert truncate(ids, mask, 10, Truncation.DROP)[2] is None


@pytest.mark.parametrize("policy, expected", [
    ("drop", {"dropped_too_long": 1, "truncated": 0}),
    ("truncate_right", {"dropped_too_long": 0, "truncated": 1}),
    ("truncate_left", {"dropped_too_long": 0, "truncated": 1}),
])
def test_long_conversations_are_counted_per_policy(tok, tmp_path, policy, expected):
    long = {"prompt": "x" * 40, "response": "y" * 40}  # 83 tokens
    records = [long] + [{"prompt": "hi", "response": "ok"}] * 30
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    it = make_sft_iterator(_cfg(path, shuffle=False, truncation=policy, num_epochs=1), tokenizer=tok, seq_len=64,
                           batch_size=1, seed=0)
    rows = list(it)
    stats = it.stats()
    assert {k: stats[k] for k in expected} == expected
    conversations = sum(int(r["segment_ids"].max()) for r in rows)
    assert stats["dropped_no_loss"] == 0 and conversations == 31 - expected["dropped_too_long"]  # nothing lost
    if policy == "truncate_left":  # the reply is kept whole, the prompt's start is gone
        first = rows[0]["inputs"][0][rows[0]["segment_ids"][0] == 1]
        assert _text(tok, first).endswith("x" + "<role>ASSISTANT</role>" + "y" * 40 + EOT) and len(first) == 64


def test_resume_gives_the_same_batches_and_counts(tok, tmp_path):
    records = chat_records(30) + [{"messages": [{"role": "user", "content": "no reply"}]}] * 3
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = _cfg(path, bad_records="skip")
    it = make_sft_iterator(cfg, tokenizer=tok, seq_len=96, batch_size=2, seed=3)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    stats = it.stats()
    again = make_sft_iterator(cfg, tokenizer=tok, seq_len=96, batch_size=2, seed=3)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all((got[k] == want[k]).all() for k in want)
    assert again.stats() == stats and stats["dropped_malformed"] > 0


def test_bad_records_stop_with_file_and_line(tok, tmp_path):
    records = chat_records(5) + [{"messages": [{"role": "robot", "content": "beep"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    it = make_sft_iterator(_cfg(path, shuffle=False), tokenizer=tok, seq_len=96, batch_size=2, seed=0)
    with pytest.raises(ChatFormatError, match=r"chat.jsonl line 6: message 0 has unknown role 'robot'.*"
                                              r"bad_records=skip"):
        for _ in range(10):
            next(it)
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    it = make_sft_iterator(_cfg(tmp_path / "broken.jsonl", shuffle=False), tokenizer=tok, seq_len=96,
                           batch_size=1, seed=0)
    with pytest.raises(ChatFormatError, match=r"broken.jsonl line 2: not a JSON object"):
        for _ in range(3):
            next(it)


def test_config_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(5))
    with pytest.raises(ValueError, match=r"data.truncation='cut'"):
        make_sft_iterator(_cfg(path, truncation="cut"), tokenizer=tok, seq_len=64, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"set data.packing=first_fit"):
        make_sft_iterator(_cfg(path, packing="concat_split"), tokenizer=tok, seq_len=64, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"set data.kind=jsonl"):
        make_sft_iterator(_cfg(path, kind="parquet"), tokenizer=tok, seq_len=64, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"needs a tokenizer"):
        make_sft_iterator(_cfg(path), tokenizer=None, seq_len=64, batch_size=1, seed=0)
    cfg = _cfg(path)
    cfg.chat.end_of_text = "</s>"
    with pytest.raises(ChatFormatError, match=r"not a token"):
        make_sft_iterator(cfg, tokenizer=tok, seq_len=64, batch_size=1, seed=0)
    all_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 90, "response": "y"}] * 3)
    it = make_sft_iterator(_cfg(all_long), tokenizer=tok, seq_len=32, batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"no usable record.*dropped_too_long"):
        next(it)


def test_a_small_file_still_holds_out_one_record(tok, tmp_path):
    """64 conversations at eval_fraction 0.001: the hash holds out none, so the last record is held out."""
    from ling_jax.data.pipeline import document_indices, forced_held_out

    assert forced_held_out(64, 0.001) == 63 and forced_held_out(64, 0.0) is None and forced_held_out(1, 0.5) is None
    assert forced_held_out(100_000, 0.001) is None  # 100 expected: the hash alone decides
    held = document_indices(64, 0.001, train=False)
    kept = document_indices(64, 0.001, train=True)
    assert held.tolist() == [63] and kept.tolist() == list(range(63))
    path = write_jsonl(tmp_path / "chat.jsonl", chat_records(64))
    batches = ling_jax.data.sft.make_sft_eval_batches(_cfg(path, eval_fraction=0.001), tokenizer=tok, seq_len=160,
                                                     batch_size=2, num_batches=1, seed=0)
    assert len(batches) == 1 and batches[0]["inputs"].shape == (2, 160)
