"""Training and evaluation data: document sources and the Grain pipeline that feeds `train.py`.

Pipeline (one per process; `make_train_iterator`):

    documents of this process's shard, minus the held-out ones
    -> global shuffle by seed (reshuffled every epoch) -> repeat `num_epochs`
    -> read + decode + tokenize + FIM (threads; `worker_count` Grain worker processes)
    -> pack into rows of `seq_len` (`ling_jax.packing`) -> batch -> skip accounting

Each batch is a dict of `[batch_size, seq_len]` int32 arrays: `inputs`, `targets` (next token within the same
document segment, -100 where there is none), `segment_ids` (1, 2, ... per packed document, 0 on padding) and
`positions` (restarting at 0 per segment). Iterators have `get_state` / `set_state` (exact resume,
JSON-serializable state) and `stats()` (documents skipped, by reason).

Documents are numbered 0..N-1 in a fixed order (files sorted by path, then line / row / record order). Document
`i` is held out for evaluation when a hash of `i` falls below `eval_fraction`, independent of the seed, so train
and eval never overlap. Process `p` of `P` trains on the held-in documents of the index range `[p*N//P, (p+1)*N//P)`.

Sources (`SourceKind`): `synthetic` (random walks over the vocabulary, a learnable signal for smoke tests),
`text_dir` (one document per file), `jsonl`, `parquet` and `array_record` (UTF-8 text records). jsonl keeps a
line index and parquet the text column of the files it read in memory: for corpora larger than memory use
array_record.
"""

from __future__ import annotations

import abc
import enum
import fnmatch
import glob
import json
import mmap
import pathlib
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags as absl_flags

from ling_jax.data import fim
from ling_jax.data.packing import PackingKind, SkipReason, StatsIterator, StatsStage, pack_and_batch
from ling_jax.data.tokenizer import Tokenizer

__all__ = ["PackingKind", "SkipReason", "SourceKind", "StatsIterator", "default_data_config", "make_eval_batches",
           "make_source", "make_train_iterator"]


class SourceKind(enum.Enum):
    """Where documents come from (`data_cfg.kind`)."""

    SYNTHETIC = "synthetic"
    TEXT_DIR = "text_dir"
    JSONL = "jsonl"
    PARQUET = "parquet"
    ARRAY_RECORD = "array_record"


# Files a directory `path` contributes, per kind (text_dir uses `file_pattern`).
_DIR_PATTERNS = {SourceKind.JSONL: "*.jsonl", SourceKind.PARQUET: "*.parquet",
                 SourceKind.ARRAY_RECORD: "*.array_record*"}
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


def default_data_config() -> ml_collections.ConfigDict:
    """The data section of a run config, every field at its default."""
    cfg = ml_collections.ConfigDict()
    cfg.kind = "synthetic"  # SourceKind: synthetic | text_dir | jsonl | parquet | array_record.
    cfg.path = ""  # A file, a directory (searched recursively, hidden entries skipped) or a glob.
    cfg.text_field = "text"  # jsonl / parquet: the key / column holding the document text.
    cfg.file_pattern = "*.py"  # text_dir: which files under `path` are documents (one file = one document).
    cfg.exclude = ""  # text_dir: comma-separated globs (relative to `path`) of files to leave out.
    cfg.tokenizer = ""  # Tokenizer path; train.py loads it and passes the object (synthetic needs none).
    cfg.vocab_size = 512  # synthetic: token ids are drawn from [0, vocab_size).
    cfg.synthetic_num_docs = 100_000  # synthetic: number of documents.
    cfg.synthetic_max_len = 0  # synthetic: documents have 2..synthetic_max_len tokens (0: seq_len).
    cfg.packing = "concat_split"  # PackingKind: concat_split (no padding) | first_fit (whole documents, padded).
    cfg.fim_rate = 0.0  # Probability that a document is fill-in-the-middle transformed (StarCoder: 0.5).
    cfg.fim_spm_rate = 0.5  # Fraction of FIM documents in SPM rather than PSM format (see ling_jax.fim).
    cfg.fim_prefix_token = fim.LING_FIM_TOKENS[0]  # Sentinel token strings; they must be in the tokenizer.
    cfg.fim_middle_token = fim.LING_FIM_TOKENS[1]
    cfg.fim_suffix_token = fim.LING_FIM_TOKENS[2]
    cfg.add_bos = False  # Prepend the tokenizer's BOS to every document.
    cfg.add_eos = True  # Append the tokenizer's EOS to every document (the model learns where documents end).
    cfg.shuffle = True  # Global shuffle of the documents by seed, different every epoch.
    cfg.eval_fraction = 0.01  # Fraction of documents held out for make_eval_batches (by a hash of the index).
    cfg.num_epochs = None  # Passes over the data (None: repeat forever).
    cfg.worker_count = 0  # Grain worker processes for reading / tokenizing / packing (0: in this process).
    return cfg


_DEFAULTS = default_data_config()


def _get(cfg: ml_collections.ConfigDict, name: str) -> Any:
    """A config field, or its default when the config predates it."""
    return cfg.get(name, _DEFAULTS[name])


def _enum(cls: type[enum.Enum], cfg: ml_collections.ConfigDict, name: str) -> Any:
    value = _get(cfg, name)
    try:
        return value if isinstance(value, cls) else cls(value)
    except ValueError:
        raise ValueError(f"data.{name}={value!r}; expected one of {[m.value for m in cls]}") from None


def _decode(data: bytes) -> str | SkipReason:
    """UTF-8 text of `data`, or the reason it cannot be used."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return SkipReason.UNDECODABLE


class Source(abc.ABC):
    """Random access to the documents of a dataset, in a fixed order."""

    where: str  # What the documents come from, for error messages.

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of documents."""

    @abc.abstractmethod
    def document(self, index: int) -> str | np.ndarray | SkipReason:
        """Document `index`: its text (token ids for synthetic data), or why it cannot be used."""


class SyntheticSource(Source):
    """Random walks over the vocabulary (steps of +1..+3 mod vocab_size): random, yet learnable (loss floor ln 3)."""

    def __init__(self, num_docs: int, max_len: int, vocab_size: int):
        if num_docs < 1 or max_len < 2 or vocab_size < 2:
            got = f"{num_docs}, {max_len}, {vocab_size}"
            raise ValueError(f"synthetic data needs num_docs >= 1, max_len >= 2, vocab_size >= 2; got {got}")
        self.num_docs, self.max_len, self.vocab_size = num_docs, max_len, vocab_size
        self.where = f"synthetic data ({num_docs} documents)"

    def __len__(self) -> int:
        return self.num_docs

    def document(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([0x53594E, index])
        length = int(rng.integers(2, self.max_len + 1))
        steps = rng.integers(1, 4, size=length)
        steps[0] = rng.integers(0, self.vocab_size)
        return (np.cumsum(steps) % self.vocab_size).astype(np.int32)


class TextDirSource(Source):
    """One document per file."""

    def __init__(self, files: list[pathlib.Path], where: str):
        if all(f.stat().st_size == 0 for f in files):
            raise ValueError(f"all {len(files)} files of {where} are empty; point data.path at files with text")
        self.files, self.where = [str(f) for f in files], where

    def __len__(self) -> int:
        return len(self.files)

    def document(self, index: int) -> str | SkipReason:
        try:
            data = pathlib.Path(self.files[index]).read_bytes()
        except OSError:
            return SkipReason.MALFORMED
        return _decode(data) if data else SkipReason.EMPTY


class _LazyFiles:
    """Per-process lazily opened resources (not pickled to Grain workers)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open, self._lock = {}, threading.Lock()


class JsonlLines(_LazyFiles):
    """The lines of jsonl files, indexed once and read through per-process memory maps."""

    def __init__(self, files: Sequence[str | pathlib.Path]):
        self.files = [str(f) for f in files]
        spans = [_line_spans(f) for f in self.files]  # (starts, ends) per file.
        self.starts, self.ends = [s for s, _ in spans], [e for _, e in spans]
        self.offsets = np.cumsum([0] + [len(s) for s in self.starts])
        self.__setstate__({})

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def line(self, index: int) -> tuple[int, int, bytes]:
        """`(file index, row in that file, the line's bytes)` of line `index` over all files."""
        f = int(np.searchsorted(self.offsets, index, side="right")) - 1
        row = index - int(self.offsets[f])
        with self._lock:
            if f not in self._open:
                with open(self.files[f], "rb") as fh:
                    self._open[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return f, row, self._open[f][int(self.starts[f][row]) : int(self.ends[f][row])]


class JsonlSource(JsonlLines, Source):
    """One JSON object per line; the document is its `text_field` string."""

    def __init__(self, files: list[pathlib.Path], text_field: str, where: str):
        super().__init__(files)
        self.text_field, self.where = text_field, where

    def document(self, index: int) -> str | SkipReason:
        _, _, line = self.line(index)
        if not line.strip():
            return SkipReason.EMPTY
        text = _decode(line)
        if isinstance(text, SkipReason):
            return text
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return SkipReason.MALFORMED
        value = obj.get(self.text_field) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            return SkipReason.MALFORMED
        return value or SkipReason.EMPTY


def _line_spans(path: str, block: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte offsets of the lines of a file, newline excluded."""
    size = pathlib.Path(path).stat().st_size
    if size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    newlines = []
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for lo in range(0, size, block):
            chunk = np.frombuffer(mm[lo : lo + block], np.uint8)
            newlines.append(np.flatnonzero(chunk == 10).astype(np.int64) + lo)
    nl = np.concatenate(newlines)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [size]])
    keep = starts < size  # No empty line after a final newline.
    return starts[keep], ends[keep]


class ParquetSource(_LazyFiles, Source):
    """One document per row, from the `text_field` column; a file's column is loaded whole on first use."""

    def __init__(self, files: list[pathlib.Path], text_field: str, where: str):
        import pyarrow as pa  # Only parquet data needs pyarrow.
        import pyarrow.parquet as pq

        is_text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
        counts = []
        for f in files:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if text_field not in names or not any(t(pf.schema_arrow.field(text_field).type) for t in is_text):
                msg = f"parquet file {f} has no text column {text_field!r} (columns {names}); set data.text_field"
                raise ValueError(msg)
            counts.append(pf.metadata.num_rows)
        self.files, self.text_field, self.where = [str(f) for f in files], text_field, where
        self.offsets = np.cumsum([0, *counts])
        self.__setstate__({})

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def document(self, index: int) -> str | SkipReason:
        import pyarrow as pa
        import pyarrow.parquet as pq

        f = int(np.searchsorted(self.offsets, index, side="right")) - 1
        with self._lock:
            if f not in self._open:
                column = pq.read_table(self.files[f], columns=[self.text_field]).column(self.text_field)
                self._open[f] = column.combine_chunks().cast(pa.large_binary())
        value = self._open[f][index - int(self.offsets[f])].as_py()
        if not isinstance(value, bytes):
            return SkipReason.MALFORMED
        return _decode(value) if value else SkipReason.EMPTY


class ArrayRecordSource(Source):
    """One document per record, the record being UTF-8 text."""

    def __init__(self, files: list[pathlib.Path], where: str):
        self.records = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        self.where = where

    def __len__(self) -> int:
        return len(self.records)

    def document(self, index: int) -> str | SkipReason:
        data = self.records[index]
        return _decode(data) if data else SkipReason.EMPTY


def _files(kind: SourceKind, path: str, file_pattern: str, exclude: str = "") -> tuple[list[pathlib.Path], str]:
    """The files of a dataset, sorted (minus those matching a comma-separated `exclude` glob), and a description."""
    if not path:
        raise ValueError(f"data.path is empty; set it to the file, directory or glob of the {kind.value} data")
    root = pathlib.Path(path).expanduser()
    if any(c in path for c in "*?["):
        files, where = [pathlib.Path(f) for f in glob.glob(str(root), recursive=True)], f"glob {path!r}"
    elif root.is_dir():
        pattern = file_pattern if kind is SourceKind.TEXT_DIR else _DIR_PATTERNS[kind]
        skip = [x.strip() for x in exclude.split(",") if x.strip()]
        files = [f for f in root.rglob(pattern) if not any(p.startswith(".") for p in f.relative_to(root).parts)
                 and not any(fnmatch.fnmatch(str(f.relative_to(root)), x) for x in skip)]
        where = f"directory {path!r} (files {pattern!r})"
    elif root.exists():
        files, where = [root], f"file {path!r}"
    else:
        raise ValueError(f"data.path {path!r} does not exist; set data.path to the {kind.value} data")
    files = sorted(f for f in files if f.is_file())
    if not files:
        fix = "data.file_pattern" if kind is SourceKind.TEXT_DIR else "data.path"
        raise ValueError(f"no {kind.value} files in {where}; check data.path and {fix}")
    return files, where


def make_source(data_cfg: ml_collections.ConfigDict, seq_len: int) -> Source:
    """The document source `data_cfg` describes (all documents, before holdout and sharding).

    Raises:
      ValueError: An unknown kind, a path with no files, or a dataset with no documents;
        the message names the path and the config field to fix.
    """
    kind = _enum(SourceKind, data_cfg, "kind")
    if kind is SourceKind.SYNTHETIC:
        max_len = _get(data_cfg, "synthetic_max_len") or seq_len
        return SyntheticSource(_get(data_cfg, "synthetic_num_docs"), max_len, _get(data_cfg, "vocab_size"))
    files, where = _files(kind, _get(data_cfg, "path"), _get(data_cfg, "file_pattern"), _get(data_cfg, "exclude"))
    if kind is SourceKind.TEXT_DIR:
        source = TextDirSource(files, where)
    elif kind is SourceKind.JSONL:
        source = JsonlSource(files, _get(data_cfg, "text_field"), where)
    elif kind is SourceKind.PARQUET:
        source = ParquetSource(files, _get(data_cfg, "text_field"), where)
    else:
        source = ArrayRecordSource(files, where)
    if len(source) == 0:
        raise ValueError(f"{where} holds no documents ({len(files)} empty files); point data.path at non-empty data")
    return source


def iter_documents(data_cfg: ml_collections.ConfigDict, *, limit: int) -> Iterator[str]:
    """Up to `limit` training texts, evenly spread over the dataset (e.g. to train a tokenizer)."""
    source = make_source(data_cfg, seq_len=1)
    indices = document_indices(len(source), _get(data_cfg, "eval_fraction"), train=True)
    for i in indices[:: max(1, len(indices) // limit)][:limit]:
        doc = source.document(int(i))
        if isinstance(doc, str):
            yield doc


def held_out(indices: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Whether each document index is held out for evaluation (a seed-independent hash of the index)."""
    z = indices.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # splitmix64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < eval_fraction


def document_indices(num_docs: int, eval_fraction: float, *, train: bool, shard: tuple[int, int] = (0, 1),
                     ) -> np.ndarray:
    """Indices of the train (or eval) documents in shard `(process_index, process_count)`, ascending."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
    p, count = shard
    lo, hi, out = p * num_docs // count, (p + 1) * num_docs // count, []
    for start in range(lo, hi, 1 << 22):
        idx = np.arange(start, min(hi, start + (1 << 22)), dtype=np.int64)
        out.append(idx[held_out(idx, eval_fraction) != train])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class _Shard(_LazyFiles):
    """The documents of one process, shuffled per epoch and repeated: item `k` is `(epoch, index, document)`.

    Grain's `shuffle` takes milliseconds per element on small datasets (< ~1000 documents), so shards of up to
    2**20 documents use a cached NumPy permutation per epoch, larger ones Grain's `index_shuffle`.
    """

    def __init__(self, source: Source, indices: np.ndarray, *, seed: int, shuffle: bool, num_epochs: int | None):
        self.source, self.indices, self.seed, self.shuffle = source, indices, seed, shuffle
        self.length = sys.maxsize if num_epochs is None else len(indices) * int(num_epochs)
        self.__setstate__({})

    def __len__(self) -> int:
        return self.length

    def _position(self, epoch: int, j: int) -> int:
        n = len(self.indices)
        if not self.shuffle:
            return j
        if n > 1 << 20:
            return int(grain.experimental.index_shuffle(j, max_index=n - 1, seed=(self.seed + epoch) % 2**32, rounds=4))
        with self._lock:
            if epoch not in self._open:  # Keep this epoch's and the previous one's (threads may straddle them).
                self._open = {e: p for e, p in self._open.items() if e == epoch - 1}
                self._open[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
            return int(self._open[epoch][j])

    def __getitem__(self, k: int) -> tuple[int, int, str | np.ndarray | SkipReason]:
        epoch, j = divmod(int(k), len(self.indices))
        index = int(self.indices[self._position(epoch, j)])
        return epoch, index, self.source.document(index)


class _Tokenize:
    """Document -> `{"inputs": int32 ids}` or `{"skip": SkipReason}`."""

    def __init__(self, encoder: fim.DocumentEncoder | None):
        self.encoder = encoder

    def __call__(self, item: tuple[int, int, str | np.ndarray | SkipReason]) -> dict[str, Any]:
        epoch, index, doc = item
        if isinstance(doc, SkipReason):
            return {"skip": doc}
        if isinstance(doc, np.ndarray):
            return {"inputs": doc}  # Synthetic token ids.
        assert self.encoder is not None
        ids = self.encoder(doc, epoch=epoch, index=index) if doc else []
        return {"inputs": np.asarray(ids, np.int32)} if len(ids) >= 2 else {"skip": SkipReason.EMPTY}


def _pipeline(data_cfg: ml_collections.ConfigDict, source: Source, indices: np.ndarray, *, tokenizer: Tokenizer | None,
              seq_len: int, batch_size: int, seed: int, num_epochs: int | None, workers: int, what: str,
              ) -> StatsIterator:
    """The Grain pipeline over the documents `indices` of `source` (module docstring)."""
    if len(indices) == 0:
        raise ValueError(f"no {what} documents in {source.where} ({len(source)} documents in all); "
                         "use more data, fewer processes, or change data.eval_fraction")
    kind = _enum(SourceKind, data_cfg, "kind")
    if kind is not SourceKind.SYNTHETIC and tokenizer is None:
        raise ValueError(f"data.kind={kind.value} needs a tokenizer; pass tokenizer=load_tokenizer(...)")
    if kind is SourceKind.SYNTHETIC and float(_get(data_cfg, "fim_rate")) > 0:
        raise ValueError("data.fim_rate > 0 needs text; synthetic data has none: set data.fim_rate=0")
    if not 0 <= seed < 2**32 or seq_len < 2 or batch_size < 1:
        raise ValueError(f"need 0 <= seed < 2**32, seq_len >= 2, batch_size >= 1; got {seed}, {seq_len}, {batch_size}")
    pad_id, encoder = 0, None
    if tokenizer is not None:
        pad_id = next((i for i in (tokenizer.pad_id, tokenizer.eos_id) if i is not None), 0)
        tokens = tuple(_get(data_cfg, f"fim_{p}_token") for p in ("prefix", "middle", "suffix"))
        encoder = fim.DocumentEncoder(tokenizer, seed=seed, fim_rate=float(_get(data_cfg, "fim_rate")),
                                      spm_rate=float(_get(data_cfg, "fim_spm_rate")), sentinel_tokens=tokens,
                                      add_bos=bool(_get(data_cfg, "add_bos")), add_eos=bool(_get(data_cfg, "add_eos")))
    # Skips in a row that mean "no usable data": with one good document a run spans at most one epoch boundary
    # (< 2n) in one process; Grain workers each see a slice of every epoch, hence the factor and the floor.
    max_skips = max(2 * len(indices) * max(1, workers), 1000)
    shard = _Shard(source, indices, seed=seed, shuffle=bool(_get(data_cfg, "shuffle")), num_epochs=num_epochs)
    ds = grain.MapDataset.source(shard).map(_Tokenize(encoder))
    packed = pack_and_batch(ds.to_iter_dataset(_READ_OPTIONS), kind=_enum(PackingKind, data_cfg, "packing"),
                            seq_len=seq_len, batch_size=batch_size, pad_id=pad_id,
                            max_consecutive_skips=max_skips, where=source.where)
    if workers > 0:
        if not absl_flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags (defaults are fine).
            absl_flags.FLAGS.mark_as_parsed()
        packed = packed.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(StatsStage(packed))


def make_train_iterator(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer | None, seq_len: int,
                        batch_size: int, seed: int, process_index: int = 0, process_count: int = 1) -> StatsIterator:
    """The training batches of one process.

    Args:
      data_cfg: See `default_data_config`.
      tokenizer: The tokenizer (None for synthetic data).
      seq_len: Tokens per row.
      batch_size: Rows per batch of this process.
      seed: Shuffle and FIM seed, in [0, 2**32).
      process_index: This process, in [0, process_count).
      process_count: Number of processes; each reads a disjoint contiguous shard of the documents.

    Returns:
      An iterator of batches (dicts of `[batch_size, seq_len]` int32 arrays: inputs, targets, segment_ids,
      positions) with `get_state`, `set_state`, `stats` and `close`; with `num_epochs` set it stops after the
      last full batch.

    Raises:
      ValueError: Bad config, no files, no documents, or (on the first `next`) no usable document.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    source = make_source(data_cfg, seq_len)
    eval_fraction = float(_get(data_cfg, "eval_fraction"))
    indices = document_indices(len(source), eval_fraction, train=True, shard=(process_index, process_count))
    return _pipeline(data_cfg, source, indices, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                     seed=seed, num_epochs=_get(data_cfg, "num_epochs"), workers=int(_get(data_cfg, "worker_count")),
                     what=f"training (shard {process_index} of {process_count})")


def make_eval_batches(data_cfg: ml_collections.ConfigDict, *, tokenizer: Tokenizer | None, seq_len: int,
                      batch_size: int, num_batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    """A fixed list of batches from the held-out documents (the same in every process).

    The held-out documents are shuffled by `seed` and repeated if they do not fill `num_batches`.

    Args:
      data_cfg: See `default_data_config`; `eval_fraction` must be > 0.
      tokenizer: The tokenizer (None for synthetic data).
      seq_len: Tokens per row.
      batch_size: Rows per batch.
      num_batches: Number of batches.
      seed: Shuffle and FIM seed, in [0, 2**32).

    Raises:
      ValueError: `eval_fraction` is 0, or no document is held out.
    """
    eval_fraction = float(_get(data_cfg, "eval_fraction"))
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"make_eval_batches needs data.eval_fraction in (0, 1), got {eval_fraction}")
    source = make_source(data_cfg, seq_len)
    indices = document_indices(len(source), eval_fraction, train=False)
    it = _pipeline(data_cfg, source, indices, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                   num_epochs=None, workers=0, what="held-out")
    batches = [next(it) for _ in range(num_batches)]
    it.close()
    return batches
