"""Tests of the pre-training data pipeline (ling_jax.data.pipeline, .sources) on tiny files of every source kind."""

from __future__ import annotations

import io
import json
import random

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from array_record.python.array_record_module import ArrayRecordWriter

from ling_jax.config import ConfigError
from ling_jax.data import fim
from ling_jax.data import pipeline as data
from ling_jax.data.counting import Count, DataError
from ling_jax.data.settings import SourceKind, default_data_config
from ling_jax.data.sources import Source, make_source
from ling_jax.data.tokenizer import load_tokenizer

WORDS = ["def", "return", "import", "class", "self", "print", "for", "in", "range", "if", "else", "x", "y",
         "foo", "bar", "=", "(", ")", ":", "+", "1", "2", "é", "\n", "    "]
FILE_KINDS = ["text_dir", "jsonl", "parquet", "array_record"]
BAD_UTF8 = b"def \xff\xfe broken"
SEQ, BATCH = 32, 4


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct code-like documents of 1 to 40 words (some longer than SEQ tokens)."""
    rng, docs = random.Random(seed), []
    while len(docs) < n:
        doc = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 40)))
        if doc not in docs:
            docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A tiny lossless SentencePiece model (~200 pieces) with the Ling FIM sentinels."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_docs(300, seed=99)), model_writer=model, vocab_size=200, minloglevel=2,
        user_defined_symbols=list(fim.LING_FIM_TOKENS), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, character_coverage=1.0, hard_vocab_limit=False,
    )
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    path.write_bytes(model.getvalue())
    return load_tokenizer(path)


def write(kind: str, docs: list[str | bytes], root) -> ml_collections.ConfigDict:
    """Writes `docs` (str, or raw bytes for broken ones) as a dataset of `kind`; returns its config."""
    raw = [d.encode() if isinstance(d, str) else d for d in docs]
    root.mkdir(parents=True, exist_ok=True)
    half = (len(docs) + 1) // 2
    if kind == "text_dir":
        for i, d in enumerate(raw):
            (root / f"sub{i % 3}").mkdir(exist_ok=True)
            (root / f"sub{i % 3}" / f"{i:03d}.py").write_bytes(d)
        (root / "notes.txt").write_text("not a .py file")
        (root / ".git").mkdir(exist_ok=True)
        (root / ".git" / "hidden.py").write_text("hidden")
    elif kind == "jsonl":
        for name, part in (("a.jsonl", docs[:half]), ("b.jsonl", docs[half:])):
            lines = [d if isinstance(d, bytes) else json.dumps({"text": d}, ensure_ascii=False).encode() for d in part]
            (root / name).write_bytes(b"\n".join(lines) + b"\n")
    elif kind == "parquet":
        for name, part in (("a.parquet", raw[:half]), ("b.parquet", raw[half:])):
            pq.write_table(pa.table({"id": list(range(len(part))), "text": pa.array(part, pa.binary())}), root / name)
    elif kind == "array_record":
        for name, part in (("a.array_record", raw[:half]), ("b.array_record", raw[half:])):
            writer = ArrayRecordWriter(str(root / name), "group_size:1")
            for d in part:
                writer.write(d)
            writer.close()
    cfg = default_data_config()
    cfg.kind, cfg.path = kind, str(root)
    return cfg


def segments(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The token ids of every packed segment of a batch."""
    out = []
    for ids, seg in zip(batch["inputs"], batch["segment_ids"], strict=True):
        out += [ids[seg == s] for s in np.unique(seg[seg > 0])]
    return out


def check_batch(batch: dict[str, np.ndarray], pad_id: int, batch_size: int = BATCH, seq_len: int = SEQ) -> None:
    """Shapes, dtypes and the packing invariants, checked position by position."""
    assert sorted(batch) == ["inputs", "positions", "segment_ids", "targets"]
    for v in batch.values():
        assert v.shape == (batch_size, seq_len) and v.dtype == np.int32
    for ids, tgt, seg, pos in zip(batch["inputs"], batch["targets"], batch["segment_ids"], batch["positions"],
                                  strict=True):
        assert seg[0] == 1
        for t in range(seq_len):
            if seg[t] == 0:  # Padding: only at the end of a row.
                assert (seg[t:] == 0).all() and ids[t] == pad_id and pos[t] == 0 and tgt[t] == -100
                break
            new = t == 0 or seg[t] != seg[t - 1]
            assert new or seg[t] == seg[t - 1]
            assert seg[t] == (1 if t == 0 else seg[t - 1] + new)
            assert pos[t] == (0 if new else pos[t - 1] + 1)
            same_next = t + 1 < seq_len and seg[t + 1] == seg[t]
            assert tgt[t] == (ids[t + 1] if same_next else -100)


def contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


@pytest.mark.parametrize("packing", ["concat_split", "first_fit"])
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_batches_from_every_source(tok, tmp_path, kind, packing):
    docs = make_docs(30)
    cfg = write(kind, docs, tmp_path / kind)
    cfg.packing, cfg.add_bos = packing, True
    it = data.make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=3)
    encoded = [tok.encode(d, add_bos=True, add_eos=True) for d in docs]
    for _ in range(6):
        batch = next(it)
        check_batch(batch, pad_id=tok.eos_id)
        for s in segments(batch):  # Every segment is a piece of a single document.
            assert any(contains(e, s.tolist()) for e in encoded)
            if packing == "first_fit":  # Whole documents, or windows of documents longer than a row.
                assert any(e == s.tolist() or (len(e) > SEQ and contains(e, s.tolist())) for e in encoded)
    assert it.stats() == {"dropped_undecodable": 0, "dropped_malformed": 0, "dropped_empty": 0, "dropped_too_long": 0,
                          "dropped_no_loss": 0, "truncated": 0}


def test_synthetic(tmp_path):
    cfg = default_data_config()
    cfg.vocab_size = 50
    runs = [[next(it) for _ in range(3)] for it in
            (data.make_train_iterator(cfg, tokenizer=None, seq_len=SEQ, batch_size=BATCH, seed=s) for s in (1, 1, 2))]
    for batch in runs[0]:
        check_batch(batch, pad_id=0)
        assert batch["inputs"].max() < 50
    assert all((a[k] == b[k]).all() for a, b in zip(runs[0], runs[1], strict=True) for k in a)
    assert not all((a["inputs"] == b["inputs"]).all() for a, b in zip(runs[0], runs[2], strict=True))
    cfg.fim_rate = 0.5
    with pytest.raises(ValueError, match="fim_rate"):
        data.make_train_iterator(cfg, tokenizer=None, seq_len=SEQ, batch_size=BATCH, seed=1)


@pytest.mark.parametrize("packing, workers, window", [("concat_split", 0, 0), ("first_fit", 0, 0),
                                                      ("concat_split", 1, 0), ("concat_split", 0, 5)])
def test_exact_resume(tok, tmp_path, packing, workers, window):
    docs = make_docs(40)
    docs[5], docs[17] = BAD_UTF8, b'{"text": 3}'  # Skipped documents count in the resumed stats too.
    cfg = write("jsonl", docs, tmp_path)
    cfg.packing, cfg.fim_rate, cfg.add_bos, cfg.eval_fraction, cfg.worker_count = packing, 0.5, True, 0.2, workers
    cfg.row_shuffle_window = window  # 5 rows: the resume point (row 12 of BATCH-row batches) falls inside a window
    kwargs = dict(tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=7)
    n = 12  # More than one epoch of the ~32 training documents.
    it = data.make_train_iterator(cfg, **kwargs)
    full = [next(it) for _ in range(n)]
    stats_full = it.stats()
    it.close()
    it = data.make_train_iterator(cfg, **kwargs)
    first = [next(it) for _ in range(n // 2)]
    state = json.loads(json.dumps(it.get_state()))  # Checkpoints store the state as JSON.
    it.close()
    resumed = data.make_train_iterator(cfg, **kwargs)
    resumed.set_state(state)
    rest = [next(resumed) for _ in range(n - n // 2)]
    assert resumed.stats() == stats_full and sum(stats_full.values()) >= 2
    resumed.close()
    for a, b in zip(full, first + rest, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def seen_documents(it, tok) -> list[str]:
    """Texts of all documents of a finite first-fit iterator (one segment = one whole document + EOS)."""
    texts = []
    for batch in it:
        for s in segments(batch):
            assert s[-1] == tok.eos_id
            texts.append(tok.decode(s[:-1]))
    return texts


def test_shards_are_disjoint_and_cover_the_data(tok, tmp_path):
    docs = make_docs(50)
    cfg = write("array_record", docs, tmp_path)
    cfg.packing, cfg.num_epochs, cfg.eval_fraction = "first_fit", 1, 0.2
    shards = [seen_documents(data.make_train_iterator(cfg, tokenizer=tok, seq_len=256, batch_size=1, seed=0,
                                                      process_index=p, process_count=2), tok) for p in range(2)]
    held_out = {d for i, d in enumerate(docs) if data.held_out(np.array([i]), 0.2)[0]}
    assert 0 < len(held_out) < 25
    assert all(len(s) == len(set(s)) for s in shards)  # One epoch: each document once.
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(docs) - held_out
    for count in (1, 3, 7):
        parts = [data.document_indices(1000, 0.1, train=True, shard=(p, count)) for p in range(count)]
        merged = np.concatenate(parts)
        assert len(merged) == len(set(merged.tolist()))
        np.testing.assert_array_equal(np.sort(merged), data.document_indices(1000, 0.1, train=True))


def test_eval_is_held_out_and_fixed(tok, tmp_path):
    docs = make_docs(50)
    cfg = write("parquet", docs, tmp_path)
    cfg.packing, cfg.eval_fraction = "first_fit", 0.2
    kwargs = dict(tokenizer=tok, seq_len=256, batch_size=2, num_batches=10, seed=5)
    batches = data.make_eval_batches(cfg, **kwargs)
    assert len(batches) == 10
    for b in batches:
        check_batch(b, pad_id=tok.eos_id, batch_size=2, seq_len=256)
    eval_docs = {tok.decode(s[:-1]) for b in batches for s in segments(b)}
    cfg.num_epochs = 1
    train_docs = set(seen_documents(data.make_train_iterator(cfg, tokenizer=tok, seq_len=256, batch_size=1,
                                                             seed=0), tok))
    assert eval_docs and not eval_docs & train_docs
    assert eval_docs | train_docs == set(docs)
    again = data.make_eval_batches(cfg, **kwargs)
    assert all((a[k] == b[k]).all() for a, b in zip(batches, again, strict=True) for k in a)
    cfg.eval_fraction = 0.0
    with pytest.raises(ValueError, match="eval_fraction"):
        data.make_eval_batches(cfg, **kwargs)


@pytest.mark.parametrize("kind", FILE_KINDS)
def test_undecodable_text_is_skipped_and_counted(tok, tmp_path, kind):
    docs: list[str | bytes] = make_docs(20)
    docs[2], docs[9] = BAD_UTF8, b"\xc3\x28 invalid"
    docs[4] = b""
    expected = {"dropped_undecodable": 2, "dropped_malformed": 0, "dropped_empty": 1, "dropped_too_long": 0,
                "dropped_no_loss": 0, "truncated": 0}
    if kind == "jsonl":
        docs[6], docs[11], docs[13] = b"{not json", b'{"content": "no text field"}', b'{"text": null}'
        expected["dropped_malformed"] = 3
    cfg = write(kind, docs, tmp_path)
    cfg.packing, cfg.num_epochs, cfg.eval_fraction, cfg.shuffle = "first_fit", 1, 0.0, False
    it = data.make_train_iterator(cfg, tokenizer=tok, seq_len=256, batch_size=1, seed=0)
    seen = seen_documents(it, tok)
    assert sorted(seen) == sorted(d for d in docs if isinstance(d, str))
    assert it.stats() == expected


def test_empty_or_unusable_dataset_is_a_clear_error(tok, tmp_path):
    kwargs = dict(tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=0)
    cfg = write("text_dir", ["def x"], tmp_path / "code")
    cfg.file_pattern = "*.rs"
    with pytest.raises(ValueError, match=r"no text_dir files in directory .*code.*'\*\.rs'.*file_pattern"):
        data.make_train_iterator(cfg, **kwargs)
    cfg = write("text_dir", ["", ""], tmp_path / "empty_files")
    with pytest.raises(ValueError, match=r"empty_files.*empty"):
        data.make_train_iterator(cfg, **kwargs)
    (tmp_path / "empty.jsonl").write_text("")
    cfg.kind, cfg.path = "jsonl", str(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match=r"empty\.jsonl.*no documents"):
        data.make_train_iterator(cfg, **kwargs)
    cfg.path = str(tmp_path / "missing" / "*.jsonl")
    with pytest.raises(ValueError, match=r"no jsonl files in glob .*missing"):
        data.make_train_iterator(cfg, **kwargs)
    cfg.path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"nowhere.*does not exist"):
        data.make_train_iterator(cfg, **kwargs)
    cfg = write("array_record", [BAD_UTF8] * 5, tmp_path / "broken")
    cfg.eval_fraction = 0.0
    it = data.make_train_iterator(cfg, **kwargs)
    with pytest.raises(DataError, match=r"no usable record in .*broken.*'dropped_undecodable': 1000"):
        next(it)


def test_config_errors(tok, tmp_path):
    kwargs = dict(tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=0)
    cfg = write("parquet", make_docs(5), tmp_path)
    for field in ("content", "id"):  # A missing column, a column of integers.
        cfg.text_field = field
        with pytest.raises(ValueError, match=rf"no text column '{field}' .*text_field"):
            data.make_train_iterator(cfg, **kwargs)
    cfg.text_field, cfg.fim_rate, cfg.fim_middle_token = "text", 0.5, "<|fim_mid|>"
    with pytest.raises(ValueError, match=r"'<\|fim_mid\|>' is not a token"):
        data.make_train_iterator(cfg, **kwargs)
    cfg.fim_rate, cfg.kind = 0.0, "csv"
    with pytest.raises(ValueError, match=r"data\.kind='csv'; expected one of"):
        data.make_train_iterator(cfg, **kwargs)
    cfg.kind, cfg.packing = "parquet", "best_fit"
    with pytest.raises(ValueError, match=r"data\.packing"):
        data.make_train_iterator(cfg, **kwargs)
    cfg.packing = "first_fit"
    with pytest.raises(ValueError, match="needs a tokenizer"):
        data.make_train_iterator(cfg, tokenizer=None, seq_len=SEQ, batch_size=BATCH, seed=0)
    with pytest.raises(ValueError, match="process_index"):
        data.make_train_iterator(cfg, **kwargs, process_index=2, process_count=2)


def test_fim_in_the_pipeline(tok, tmp_path):
    docs = make_docs(40)
    cfg = write("text_dir", docs, tmp_path)
    cfg.packing, cfg.fim_rate, cfg.fim_spm_rate, cfg.num_epochs, cfg.eval_fraction = "first_fit", 1.0, 0.5, 1, 0.0
    sentinels = fim.FimSentinels.from_tokenizer(tok)
    it = data.make_train_iterator(cfg, tokenizer=tok, seq_len=256, batch_size=1, seed=0)
    formats, texts = [], []
    for batch in it:
        for s in segments(batch):
            assert s[-1] == tok.eos_id
            formats.append(fim.format_of(s[:-1], sentinels))
            texts.append(tok.decode(fim.reassemble(s[:-1], sentinels)))
    assert sorted(texts) == sorted(docs)
    assert set(formats) == {fim.FimFormat.PSM, fim.FimFormat.SPM}


def test_default_config_fields():
    cfg = default_data_config()
    for field in ["kind", "path", "text_field", "file_pattern", "tokenizer", "vocab_size", "fim_rate", "fim_spm_rate",
                  "fim_prefix_token", "fim_middle_token", "fim_suffix_token", "add_bos", "add_eos", "shuffle",
                  "eval_fraction", "num_epochs", "worker_count"]:
        assert field in cfg
    assert cfg.fim_prefix_token == "<|fim_prefix|>" and SourceKind(cfg.kind) is SourceKind.SYNTHETIC


class _Numbers(Source):
    """Document i is str(i)."""

    where = "numbers"

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def document(self, index: int) -> str:
        return str(index)


@pytest.mark.parametrize("n", [7, (1 << 20) + 3])  # A NumPy permutation per epoch; Grain's index_shuffle.
def test_every_epoch_is_a_new_permutation(n):
    indices = np.arange(n, dtype=np.int64) * 2
    shard = data.Shard(_Numbers(2 * n), indices, seed=1, shuffle=True, num_epochs=3)
    assert len(shard) == 3 * n
    count = min(n, 2000)
    epochs = [[shard[e * n + j] for j in range(count)] for e in range(3)]
    for e, items in enumerate(epochs):
        assert all(epoch == e and doc == str(index) and index % 2 == 0 for epoch, index, doc in items)
        assert len({index for _, index, _ in items}) == count
    if count == n:
        assert {i for _, i, _ in epochs[0]} == set(indices.tolist())
    assert [i for _, i, _ in epochs[0]] != [i for _, i, _ in epochs[1]]
    again = data.Shard(_Numbers(2 * n), indices, seed=1, shuffle=True, num_epochs=3)
    assert [again[k] for k in range(count)] == epochs[0]
    ordered = data.Shard(_Numbers(2 * n), indices, seed=1, shuffle=False, num_epochs=None)
    assert [ordered[n + j][1] for j in range(5)] == [0, 2, 4, 6, 8]


def test_array_record_json_records_read_their_text_field(tmp_path):
    """`data.record_format=json`: each record is a JSON object (ling_jax.curation's output); text records still work."""
    docs = [{"text": f"doc {i}", "language": "python", "score": 0.5} for i in range(4)]
    raw = [json.dumps(d).encode() for d in docs] + [b"not json", json.dumps({"other": 1}).encode(), b""]
    cfg = write("array_record", raw, tmp_path / "json")
    cfg.record_format = "json"
    source = make_source(cfg, seq_len=16)
    got = [source.document(i) for i in range(len(source))]
    assert sorted(g for g in got if isinstance(g, str)) == [f"doc {i}" for i in range(4)]
    assert sorted(g.value for g in got if not isinstance(g, str)) == sorted(
        [Count.DROPPED_MALFORMED.value, Count.DROPPED_MALFORMED.value, Count.DROPPED_EMPTY.value])
    cfg.record_format = "text"  # The same records as plain text: the JSON itself is the document.
    assert make_source(cfg, seq_len=16).document(0) == json.dumps(docs[0])
    cfg.record_format = "yaml"
    with pytest.raises(ConfigError, match=r"data\.record_format='yaml'"):
        make_source(cfg, seq_len=16)
