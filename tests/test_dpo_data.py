"""DPO pair data (ling_jax.data.dpo): padded chosen / rejected rows with targets on the response tokens only,
both sides on the same prompt under truncation, counts, exact resume and bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest
from post_training_helpers import EOT, char_tokenizer_json, preference_records, write_jsonl

import ling_jax
from ling_jax.data.chat import ChatFormatError
from ling_jax.data.dpo import make_dpo_eval_batches, make_dpo_iterator
from ling_jax.data.settings import default_post_training_data_config

# Ids of the character tokenizer: 3 <role>HUMAN</role>, 4 <role>ASSISTANT</role>, 5 EOT, then "a" = 6, "b" = 7, ...
HUMAN, ASSISTANT, END, A, B, C, D, E = 3, 4, 5, 6, 7, 8, 9, 10
IGN = -100


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return ling_jax.load_tokenizer(char_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _cfg(path, **changes):
    c = default_post_training_data_config()
    c.path, c.eval_fraction, c.shuffle = str(path), 0.0, False
    c.update(changes)
    return c


def _text(tok, ids):
    return "".join(tok.id_to_token(int(i)) for i in ids)


def test_pair_rows_have_targets_on_the_response_tokens_only(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "ab", "chosen": "cd", "rejected": "e"},
        {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": "b"}],
         "rejected": "cc"},
    ])
    it = make_dpo_iterator(_cfg(path), tokenizer=tok, seq_len=10, batch_size=2, seed=0)
    batch = {k: v.tolist() for k, v in next(it).items()}
    pad = tok.padding_id
    assert batch["chosen_inputs"] == [[HUMAN, A, B, ASSISTANT, C, D, END, pad, pad, pad],
                                      [HUMAN, A, ASSISTANT, B, END, pad, pad, pad, pad, pad]]
    # Position t targets token t + 1 when that token is the reply or its end-of-text token.
    assert batch["chosen_targets"] == [[IGN, IGN, IGN, C, D, END, IGN, IGN, IGN, IGN],
                                       [IGN, IGN, B, END, IGN, IGN, IGN, IGN, IGN, IGN]]
    assert batch["rejected_inputs"] == [[HUMAN, A, B, ASSISTANT, E, END, pad, pad, pad, pad],
                                        [HUMAN, A, ASSISTANT, C, C, END, pad, pad, pad, pad]]
    assert batch["rejected_targets"] == [[IGN, IGN, IGN, E, END, IGN, IGN, IGN, IGN, IGN],
                                         [IGN, IGN, C, C, END, IGN, IGN, IGN, IGN, IGN]]
    assert batch["chosen_segment_ids"] == [[1] * 7 + [0] * 3, [1] * 5 + [0] * 5]
    assert batch["rejected_positions"] == [[0, 1, 2, 3, 4, 5, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5, 0, 0, 0, 0]]
    assert sum(it.stats().values()) == 0


def test_pair_batches(tok, tmp_path):
    records = preference_records(6)
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    batch = next(make_dpo_iterator(_cfg(path), tokenizer=tok, seq_len=80, batch_size=2, seed=0))
    assert sorted(batch) == sorted(f"{s}_{k}" for s in ("chosen", "rejected")
                                   for k in ("inputs", "targets", "segment_ids", "positions"))
    assert all(v.shape == (2, 80) and v.dtype == np.int32 for v in batch.values())
    for row, (prompt, words) in enumerate([(records[0]["prompt"], records[0]["chosen"]),
                                           (records[1]["prompt"][0]["content"], records[1]["chosen"][0]["content"])]):
        n = int(batch["chosen_segment_ids"][row].sum())
        assert _text(tok, batch["chosen_inputs"][row, :n]) == (
            f"<role>HUMAN</role>{prompt}<role>ASSISTANT</role>{words}{EOT}")
        targets = batch["chosen_targets"][row]
        assert _text(tok, targets[targets != -100]) == words + EOT
        rejected = batch["rejected_targets"][row]
        assert _text(tok, rejected[rejected != -100]).endswith(EOT)


def test_pair_truncation_keeps_both_sides_on_the_same_prompt(tok, tmp_path):
    records = [{"prompt": "p" * 40, "chosen": "c" * 10, "rejected": "r" * 20}] + preference_records(4)
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    it = make_dpo_iterator(_cfg(path, truncation="truncate_left"), tokenizer=tok, seq_len=48, batch_size=1, seed=0)
    batch = next(it)
    chosen = _text(tok, batch["chosen_inputs"][0][batch["chosen_segment_ids"][0] > 0])
    rejected = _text(tok, batch["rejected_inputs"][0][batch["rejected_segment_ids"][0] > 0])
    # rejected has 1 + 40 + 1 + 20 + 1 = 63 tokens: 15 leading prompt tokens go from both sides.
    assert rejected == "p" * 26 + "<role>ASSISTANT</role>" + "r" * 20 + EOT and len(batch["rejected_inputs"][0]) == 48
    assert chosen == "p" * 26 + "<role>ASSISTANT</role>" + "c" * 10 + EOT
    assert it.stats()["truncated"] == 1
    it = make_dpo_iterator(_cfg(path), tokenizer=tok, seq_len=48, batch_size=1, seed=0)
    next(it)
    assert it.stats()["dropped_too_long"] == 1  # the default policy, drop, counts it


def test_truncate_right_cuts_each_side_on_its_own(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "ab", "chosen": "c" * 12, "rejected": "d"}])
    it = make_dpo_iterator(_cfg(path, truncation="truncate_right"), tokenizer=tok, seq_len=10, batch_size=1, seed=0)
    batch = {k: v.tolist()[0] for k, v in next(it).items()}
    assert batch["chosen_inputs"] == [HUMAN, A, B, ASSISTANT] + [C] * 6  # no end-of-text token left
    assert batch["chosen_targets"] == [IGN, IGN, IGN] + [C] * 6 + [IGN]
    assert batch["rejected_targets"] == [IGN, IGN, IGN, D, END, IGN, IGN, IGN, IGN, IGN]
    assert it.stats()["truncated"] == 1


def test_truncate_left_drops_a_pair_whose_cut_would_reach_a_response(tok, tmp_path):
    # The chosen side has 1 + 2 + 1 + 20 + 1 = 25 tokens: 15 would have to go, but the response starts at 3.
    records = [{"prompt": "ab", "chosen": "c" * 20, "rejected": "d"}] + [{"prompt": "a", "chosen": "b",
                                                                          "rejected": "c"}] * 2
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    it = make_dpo_iterator(_cfg(path, truncation="truncate_left", num_epochs=1), tokenizer=tok, seq_len=10,
                           batch_size=1, seed=0)
    assert len(list(it)) == 2
    assert it.stats()["dropped_no_loss"] == 1 and it.stats()["truncated"] == 0


def test_resume_gives_the_same_pairs_and_counts(tok, tmp_path):
    records = preference_records(12) + [{"prompt": "q", "chosen": "yes", "rejected": ""}] * 2
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    cfg = _cfg(path, shuffle=True, bad_records="skip")
    it = make_dpo_iterator(cfg, tokenizer=tok, seq_len=64, batch_size=2, seed=4)
    next(it), next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(12)]  # past the end of the first epoch
    again = make_dpo_iterator(cfg, tokenizer=tok, seq_len=64, batch_size=2, seed=4)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all((got[k] == want[k]).all() for k in want)
    assert again.stats() == it.stats() and it.stats()["dropped_malformed"] >= 2


def test_eval_batches_come_from_held_out_pairs(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", preference_records(40))
    batches = make_dpo_eval_batches(_cfg(path, eval_fraction=0.25), tokenizer=tok, seq_len=64, batch_size=2,
                                    num_batches=3, seed=0)
    assert len(batches) == 3 and all(b["chosen_inputs"].shape == (2, 64) for b in batches)
    with pytest.raises(ValueError, match=r"data.eval_fraction in \(0, 1\)"):
        make_dpo_eval_batches(_cfg(path), tokenizer=tok, seq_len=64, batch_size=2, num_batches=3, seed=0)


def test_bad_pairs(tok, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "", "rejected": "no"}])
    with pytest.raises(ChatFormatError, match=r"pairs.jsonl line 1: 'chosen' is empty.*bad_records=skip"):
        next(make_dpo_iterator(_cfg(path), tokenizer=tok, seq_len=48, batch_size=1, seed=0))
    records = preference_records(3)
    records.insert(1, {"prompt": "q", "chosen": "yes", "rejected": ""})
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    it = make_dpo_iterator(_cfg(path, bad_records="skip", num_epochs=1), tokenizer=tok, seq_len=64, batch_size=1,
                           seed=0)
    assert len(list(it)) == 3 and it.stats()["dropped_malformed"] == 1
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    it = make_dpo_iterator(_cfg(tmp_path / "broken.jsonl"), tokenizer=tok, seq_len=48, batch_size=1, seed=0)
    with pytest.raises(ChatFormatError, match=r"broken.jsonl line 2: not a JSON object"):
        next(it), next(it)
