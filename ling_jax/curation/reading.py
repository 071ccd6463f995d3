"""The inputs of the pipeline as Beam transforms: a directory of repositories, The Stack v2 records, text jsonl.

- `ReadRepositories(root)`: each subfolder of `root` is a repository; its files are read as bytes on the
  workers (the driver lists only the repository names). Binary files (NUL bytes), files over the size limit,
  empty files, undecodable files and symlinks leaving the repository are dropped and counted (stage `read`).
- `ReadStack(pattern)`: jsonl or parquet files of `{repo_name, path, content[, language, stars, forks,
  license]}` (The Stack v2 layout); a record without them is counted `malformed`.
- `ReadText(pattern, text_field)`: jsonl of code-related text documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import apache_beam as beam

from ling_jax.curation.records import DocKind, Reason, Stage, count, count_drop, count_out, record, timed
from ling_jax.curation.settings import bounded


@dataclasses.dataclass(frozen=True)
class ReadSettings:
    """Reading (config section `read`)."""

    max_file_bytes: int = bounded(1_000_000, 1)  # Files (and records) larger than this are dropped.
    text_field: str = bounded("text")  # Text jsonl: the key holding the document.


def _decoded(repo: str, path: str, data: bytes, max_bytes: int, kind: DocKind = DocKind.FILE, **fields):
    """The record of a file's bytes, or None after counting why it is dropped."""
    count(Stage.READ, "docs_in")
    count(Stage.READ, "bytes_in", len(data))
    if not data:
        count_drop(Stage.READ, Reason.EMPTY)
        return None
    if len(data) > max_bytes:
        count_drop(Stage.READ, Reason.TOO_LARGE)
        return None
    if b"\0" in data:
        count_drop(Stage.READ, Reason.BINARY)
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        count_drop(Stage.READ, Reason.UNDECODABLE)
        return None
    rec = record(repo, path, text, kind, **fields)
    count_out(Stage.READ, rec)
    return rec


def repository_files(repo: str, root: str, max_bytes: int):
    """The records of the files of repository `repo` under `root`, in path order."""
    top = os.path.realpath(os.path.join(root, repo))
    found = []
    for here, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(here, d)))
        found += [os.path.join(here, f) for f in files if not f.startswith(".")]
    for full in sorted(found):
        rel = os.path.relpath(full, top).replace(os.sep, "/")
        real = os.path.realpath(full)
        if os.path.islink(full) and not (real == top or real.startswith(top + os.sep)):
            count(Stage.READ, "docs_in")
            count_drop(Stage.READ, Reason.SYMLINK_OUTSIDE)
            continue
        try:
            if os.path.getsize(real) > max_bytes:  # Not read at all.
                count(Stage.READ, "docs_in")
                count_drop(Stage.READ, Reason.TOO_LARGE)
                continue
            with open(real, "rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError:
            count(Stage.READ, "docs_in")
            count_drop(Stage.READ, Reason.MALFORMED)
            continue
        rec = _decoded(repo, rel, data, max_bytes)
        if rec is not None:
            yield rec


def repositories(root: str) -> list[str]:
    """The repository names (non-hidden subfolders) of `root`, sorted."""
    return sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))


class ReadRepositories(beam.PTransform):
    """Records of the files of every repository under `root`."""

    def __init__(self, root: str, settings: ReadSettings):
        super().__init__()
        self.root, self.settings = root, settings

    def expand(self, pbegin):
        root, max_bytes = self.root, self.settings.max_file_bytes
        return (pbegin | "Repositories" >> beam.Create(repositories(root))
                | "Spread" >> beam.Reshuffle()
                | "ReadFiles" >> beam.FlatMap(timed(Stage.READ, repository_files), root, max_bytes))


def stack_record(row: dict, max_bytes: int):
    """The record of one row of The Stack v2 layout, or None after counting why it is dropped."""
    repo, path, content = row.get("repo_name"), row.get("path"), row.get("content")
    if not isinstance(repo, str) or not isinstance(path, str) or not isinstance(content, (str, bytes)):
        count(Stage.READ, "docs_in")
        count_drop(Stage.READ, Reason.MALFORMED)
        return None
    data = content.encode("utf-8") if isinstance(content, str) else content
    stars = row.get("stars", row.get("max_stars_count")) or 0
    fields = {"stars": int(stars), "forks": int(row.get("forks") or 0), "license": row.get("license")}
    if isinstance(row.get("language"), str):
        fields["declared_language"] = row["language"]
    return _decoded(repo, path, data, max_bytes, **fields)


def _json_row(line: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return row if isinstance(row, dict) else {}


class ReadStack(beam.PTransform):
    """Records of jsonl (`*.jsonl`) or parquet (`*.parquet`) files in The Stack v2 layout."""

    def __init__(self, pattern: str, parquet: bool, settings: ReadSettings):
        super().__init__()
        self.pattern, self.parquet, self.settings = pattern, parquet, settings

    def expand(self, pbegin):
        max_bytes = self.settings.max_file_bytes
        if self.parquet:
            rows = pbegin | "ReadParquet" >> beam.io.ReadFromParquet(self.pattern)
        else:
            rows = (pbegin | "ReadJsonl" >> beam.io.ReadFromText(self.pattern)
                    | "ParseJson" >> beam.Map(_json_row))
        return rows | "ToRecords" >> beam.FlatMap(lambda row: [r for r in [stack_record(row, max_bytes)] if r])


def text_record(item: tuple[str, str], text_field: str, max_bytes: int):
    """The record of one line `(file, line)` of a text jsonl, or None after counting why it is dropped."""
    name, line = item
    row = _json_row(line)
    text = row.get(text_field)
    if not isinstance(text, str):
        count(Stage.READ, "docs_in")
        count_drop(Stage.READ, Reason.MALFORMED)
        return None
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
    path = str(row.get("id") or f"{os.path.basename(name)}#{digest}")
    return _decoded("", path, text.encode("utf-8"), max_bytes, DocKind.TEXT, language="text")


class ReadText(beam.PTransform):
    """Records of jsonl files of code-related text (`text_field` holds the document)."""

    def __init__(self, pattern: str, settings: ReadSettings):
        super().__init__()
        self.pattern, self.settings = pattern, settings

    def expand(self, pbegin):
        field, max_bytes = self.settings.text_field, self.settings.max_file_bytes
        return (pbegin | "ReadJsonl" >> beam.io.ReadFromTextWithFilename(self.pattern)
                | "ToRecords" >> beam.FlatMap(lambda item: [r for r in [text_record(item, field, max_bytes)] if r]))
