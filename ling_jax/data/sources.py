"""Document sources: random access, in a fixed order, to the documents of a dataset (`data.kind`).

Sources (`SourceKind`): `synthetic` (random walks over the vocabulary, a learnable signal for smoke tests),
`text_dir` (one document per file), `jsonl`, `parquet` and `array_record` (records of UTF-8 text, or with
`data.record_format=json` JSON objects whose `text_field` is the document, as `ling_jax.curation` writes). Documents
are numbered 0..N-1: files sorted by path, then line / row / record order. jsonl keeps a line index and
parquet the text column of the files it read in memory: for corpora larger than memory use array_record.

`document(i)` is the text of document `i` (token ids for synthetic data), or the `Count` saying why it
cannot be used. Sources are pickled to Grain's worker processes; open files and memory maps are not
(`LazyFiles`), each process opens its own.
"""

from __future__ import annotations

import abc
import fnmatch
import glob
import json
import mmap
import pathlib
import threading
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from ling_jax.config import ConfigError
from ling_jax.data.counting import Count, DataError
from ling_jax.data.settings import RecordFormat, SourceKind, option

__all__ = ["ArrayRecordSource", "JsonlLines", "JsonlSource", "LazyFiles", "ParquetSource", "RecordSource", "Source",
           "SourceKind", "SyntheticSource", "TextDirSource", "find_files", "make_source"]

# Files a directory `path` contributes, per kind (text_dir uses `file_pattern`).
_DIR_PATTERNS = {SourceKind.JSONL: "*.jsonl", SourceKind.PARQUET: "*.parquet",
                 SourceKind.ARRAY_RECORD: "*.array_record*"}


def _decode(data: bytes) -> str | Count:
    """UTF-8 text of `data`, or the reason it cannot be used."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Count.DROPPED_UNDECODABLE


class Source(abc.ABC):
    """Random access to the documents of a dataset, in a fixed order."""

    where: str  # What the documents come from, for error messages.

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of documents."""

    @abc.abstractmethod
    def document(self, index: int) -> str | np.ndarray | Count:
        """Document `index`: its text (token ids for synthetic data), or why it cannot be used."""


class SyntheticSource(Source):
    """Random walks over the vocabulary (steps of +1..+3 mod vocab_size): random, yet learnable (loss floor ln 3)."""

    def __init__(self, num_docs: int, max_len: int, vocab_size: int, seed: int = 0):
        if num_docs < 1 or max_len < 2 or vocab_size < 2:
            got = f"data.synthetic_num_docs={num_docs}, max length {max_len}, data.vocab_size={vocab_size}"
            raise ConfigError(f"synthetic data needs at least 1 document of 2 tokens over a vocabulary of 2; got {got}")
        self.num_docs, self.max_len, self.vocab_size = num_docs, max_len, vocab_size
        self.key = [0x53594E] if seed == 0 else [0x53594E, int(seed)]  # seed 0: the walks of old configs
        self.where = f"synthetic data ({num_docs} documents{f', seed {seed}' if seed else ''})"

    def __len__(self) -> int:
        return self.num_docs

    def document(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([*self.key, index])
        length = int(rng.integers(2, self.max_len + 1))
        steps = rng.integers(1, 4, size=length)
        steps[0] = rng.integers(0, self.vocab_size)
        return (np.cumsum(steps) % self.vocab_size).astype(np.int32)


class TextDirSource(Source):
    """One document per file."""

    def __init__(self, files: list[pathlib.Path], where: str):
        if all(f.stat().st_size == 0 for f in files):
            raise DataError(f"all {len(files)} files of {where} are empty; point data.path at files with text")
        self.files, self.where = [str(f) for f in files], where

    def __len__(self) -> int:
        return len(self.files)

    def document(self, index: int) -> str | Count:
        try:
            data = pathlib.Path(self.files[index]).read_bytes()
        except FileNotFoundError:  # listed at start, gone now: skipping it would change the run's data
            raise DataError(f"{self.files[index]} of {self.where} disappeared during the run; put it back and run "
                            "the same command to resume from the last checkpoint (or start a new --workdir)") from None
        except OSError:
            return Count.DROPPED_MALFORMED
        return _decode(data) if data else Count.DROPPED_EMPTY


class LazyFiles:
    """Per-process lazily opened resources (not pickled to Grain workers)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open, self._lock = {}, threading.Lock()


class JsonlLines(LazyFiles):
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

    def document(self, index: int) -> str | Count:
        _, _, line = self.line(index)
        if not line.strip():
            return Count.DROPPED_EMPTY
        return _json_text(line, self.text_field)


def _json_text(data: bytes, text_field: str) -> str | Count:
    """The `text_field` string of the JSON object `data` holds, or the reason it cannot be used."""
    text = _decode(data)
    if isinstance(text, Count):
        return text
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return Count.DROPPED_MALFORMED
    value = obj.get(text_field) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        return Count.DROPPED_MALFORMED
    return value or Count.DROPPED_EMPTY


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


class ParquetSource(LazyFiles, Source):
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
                raise ConfigError(msg)
            counts.append(pf.metadata.num_rows)
        self.files, self.text_field, self.where = [str(f) for f in files], text_field, where
        self.offsets = np.cumsum([0, *counts])
        self.__setstate__({})

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def document(self, index: int) -> str | Count:
        import pyarrow as pa
        import pyarrow.parquet as pq

        f = int(np.searchsorted(self.offsets, index, side="right")) - 1
        with self._lock:
            if f not in self._open:
                column = pq.read_table(self.files[f], columns=[self.text_field]).column(self.text_field)
                self._open[f] = column.combine_chunks().cast(pa.large_binary())
        value = self._open[f][index - int(self.offsets[f])].as_py()
        if not isinstance(value, bytes):
            return Count.DROPPED_MALFORMED
        return _decode(value) if value else Count.DROPPED_EMPTY


class ArrayRecordSource(Source):
    """One document per record: the record's UTF-8 text, or (`RecordFormat.JSON`) a JSON object's `text_field`."""

    def __init__(self, files: list[pathlib.Path], where: str, record_format: RecordFormat = RecordFormat.TEXT,
                 text_field: str = "text"):
        self.records = grain.sources.ArrayRecordDataSource([str(f) for f in files])
        self.where, self.record_format, self.text_field = where, record_format, text_field

    def __len__(self) -> int:
        return len(self.records)

    def document(self, index: int) -> str | Count:
        data = self.records[index]
        if not data:
            return Count.DROPPED_EMPTY
        if self.record_format is RecordFormat.JSON:
            return _json_text(data, self.text_field)
        return _decode(data)


def find_files(kind: SourceKind, path: str, file_pattern: str, exclude: str = "") -> tuple[list[pathlib.Path], str]:
    """The files of a dataset, sorted (minus those matching a comma-separated `exclude` glob), and a description."""
    if not path:
        raise ConfigError(f"data.path is empty; set it to the file, directory or glob of the {kind.value} data")
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
        raise ConfigError(f"data.path {path!r} does not exist; set data.path to the {kind.value} data")
    files = sorted(f for f in files if f.is_file())
    if not files:
        fix = "data.file_pattern" if kind is SourceKind.TEXT_DIR else "data.path"
        raise ConfigError(f"no {kind.value} files in {where}; check data.path and {fix}")
    return files, where


def make_source(data_cfg: ml_collections.ConfigDict, seq_len: int) -> Source:
    """The document source `data_cfg` describes (all documents, before holdout and sharding).

    Raises:
      ConfigError: An unknown kind, a path with no files; the message names the path and the field to fix.
      DataError: A dataset with no documents.
    """
    kind = option(data_cfg, "kind", SourceKind)
    if kind is SourceKind.SYNTHETIC:
        max_len = option(data_cfg, "synthetic_max_len") or seq_len
        return SyntheticSource(option(data_cfg, "synthetic_num_docs"), max_len, option(data_cfg, "vocab_size"),
                               option(data_cfg, "synthetic_seed"))
    files, where = find_files(kind, option(data_cfg, "path"), option(data_cfg, "file_pattern"),
                              option(data_cfg, "exclude"))
    text_field = option(data_cfg, "text_field")
    make = {SourceKind.TEXT_DIR: lambda: TextDirSource(files, where),
            SourceKind.JSONL: lambda: JsonlSource(files, text_field, where),
            SourceKind.PARQUET: lambda: ParquetSource(files, text_field, where),
            SourceKind.ARRAY_RECORD: lambda: ArrayRecordSource(
                files, where, option(data_cfg, "record_format", RecordFormat), text_field)}[kind]
    source = make()
    if len(source) == 0:
        raise DataError(f"{where} holds no documents ({len(files)} empty files); point data.path at non-empty data")
    return source


class RecordSource(JsonlLines, Source):
    """The SFT / DPO records: the lines of jsonl files; `document(i)` is `(where, parsed object or None, error)`.

    `where` names the file and line; the object is None for a blank line (not a record) and on an error
    (the line is not JSON), which is then the message.
    """

    def __init__(self, data_cfg: ml_collections.ConfigDict):
        kind = option(data_cfg, "kind", SourceKind)
        if kind is not SourceKind.JSONL:
            raise ConfigError(f"post-training reads jsonl records, but data.kind={kind.value}; set data.kind=jsonl")
        files, self.where = find_files(kind, option(data_cfg, "path"), "*.jsonl")
        super().__init__(files)
        if len(self) == 0:
            raise DataError(f"{self.where} holds no records; point data.path at non-empty jsonl data")

    def document(self, index: int) -> tuple[str, Any, str | None]:
        f, row, line = self.line(index)
        where = f"{self.files[f]} line {row + 1}"
        if not line.strip():
            return where, None, None
        try:
            return where, json.loads(line.decode("utf-8")), None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return where, None, f"{where}: not a JSON object ({e})"
