"""Writing the curated records: sharded ArrayRecord files of JSON records (optionally jsonl too).

Each record goes to shard `sha256(id) mod num_shards`, and a shard's records are sorted by id, so the output
is the same bytes whatever the input order, the runner or the number of workers. One record per document:
the UTF-8 JSON object (keys sorted) with `text` and the metadata; `train.py` reads them with
`data.kind=array_record`, `data.record_format=json`. Shards are written on the workers through Beam's
`FileSystems` (local paths, or gs:// and the like on a cluster) into the directory the driver renames when
the whole pipeline succeeded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from array_record.python.array_record_module import ArrayRecordWriter

from ling_jax.curation.records import Record, Stage, count, count_in, count_out, timed
from ling_jax.io.atomic import OutputDirError


def encode(rec: Record) -> bytes:
    """The bytes of one output record: its JSON, keys sorted, UTF-8."""
    return json.dumps(rec, sort_keys=True, ensure_ascii=False).encode("utf-8")


def shard_of(rec_id: str, num_shards: int) -> int:
    """The shard of a record id."""
    return int.from_bytes(hashlib.sha256(rec_id.encode("utf-8")).digest()[:8], "big") % num_shards


def is_remote(path: str) -> bool:
    """Whether `path` names a Beam filesystem other than the local one (gs://, s3://, hdfs://, ...)."""
    return "://" in path


@contextlib.contextmanager
def remote_output_dir(out: str, overwrite: bool) -> Iterator[str]:
    """`atomic_output_dir` for a remote filesystem: write under `OUT.tmp-XXXX`, move each file when complete.

    Object stores have no directory rename; the files are moved one by one after the pipeline succeeded, the
    report last, so a finished output is one with `report.json`.

    Raises:
      OutputDirError: `out` exists and `overwrite` is false.
    """
    if FileSystems.exists(out) and not overwrite:
        raise OutputDirError(f"output directory {out} already exists: set overwrite=True or choose another output")
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if FileSystems.exists(out):
            FileSystems.delete([out])
        files = sorted(m.path for m in FileSystems.match([FileSystems.join(tmp, "**")])[0].metadata_list)
        files.sort(key=lambda f: f.endswith("report.json"))
        FileSystems.rename(files, [out + f[len(tmp):] for f in files])
    finally:
        if FileSystems.exists(tmp):
            FileSystems.delete([tmp])


def publish(local: str, dest: str) -> None:
    """Copies the local file `local` to `dest` on any Beam filesystem."""
    _copy_to(local, dest)


def _copy_to(local: str, dest: str) -> None:
    with open(local, "rb") as src, FileSystems.create(dest) as out:
        while chunk := src.read(1 << 22):
            out.write(chunk)


def write_shard(item: tuple[int, list[Record]], directory: str, prefix: str, num_shards: int, jsonl: bool,
                stage: Stage) -> str:
    """Writes shard `item = (index, records)`; returns the ArrayRecord file's path."""
    index, recs = item
    recs = sorted(recs, key=lambda r: r["id"])
    name = f"{prefix}-{index:05d}-of-{num_shards:05d}"
    dest = FileSystems.join(directory, name + ".array_record")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        writer = ArrayRecordWriter(local, "group_size:1")
        for rec in recs:
            writer.write(encode(rec))
            count_in(stage, rec)
            count_out(stage, rec)
            count(stage, f"lang_{rec['language']}")
        writer.close()
        _copy_to(local, dest)
        if jsonl:
            with open(local + ".jsonl", "wb") as fh:
                fh.writelines(encode(r) + b"\n" for r in recs)
            _copy_to(local + ".jsonl", FileSystems.join(directory, name + ".jsonl"))
    return dest


class WriteShards(beam.PTransform):
    """Writes records into `num_shards` ArrayRecord files `<prefix>-NNNNN-of-MMMMM.array_record` in `directory`."""

    def __init__(self, directory: str, prefix: str, num_shards: int, jsonl: bool, stage: Stage = Stage.WRITE):
        super().__init__()
        self.directory, self.prefix, self.num_shards, self.jsonl, self.stage = (
            directory, prefix, num_shards, jsonl, stage)

    def expand(self, records):
        n = self.num_shards
        return (records | "KeyByShard" >> beam.Map(lambda r: (shard_of(r["id"], n), r))
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.FlatMap(timed(self.stage, lambda kv: [write_shard(
                    (kv[0], list(kv[1])), self.directory, self.prefix, n, self.jsonl, self.stage)])))
