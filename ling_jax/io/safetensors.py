"""Hugging Face safetensors checkpoints: a lazy reader, a streaming writer and the shard planner.

A directory holds `config.json` and either `model.safetensors` or shards
listed by `model.safetensors.index.json`. Tensors are read lazily, one at a
time, through `SafetensorsCheckpoint`, so loading needs the model's memory plus
one tensor, never a second copy of the checkpoint. `write_hf_shards` writes
shards the same way in reverse: each file's header is computed from the tensor
list up front and the tensors are produced and written one at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open

from ling_jax.io.hf_names import CheckpointError, CheckpointNotFoundError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_ST_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32), "I64": np.dtype(np.int64), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """A read-only name -> NumPy array view over (sharded) safetensors files.

    Every file is validated on opening; tensors are loaded on access, one read
    each; `shapes()` and `dtypes()` use only the headers.

    Raises (on opening):
      CheckpointNotFoundError: no `model.safetensors` nor index, or a shard the index lists is missing.
      CheckpointError: a file that is not a readable safetensors file.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            self.weight_map = None
        else:
            raise CheckpointNotFoundError(
                f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}: point at a Hugging Face "
                "checkpoint directory")
        files = sorted(set(self.weight_map.values())) if self.weight_map else [SINGLE_FILE]
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise CheckpointNotFoundError(f"shard file(s) listed in {INDEX_FILE} are missing from "
                                    f"{directory}: {', '.join(missing)}; re-download the checkpoint "
                                    "or fix the index")
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}
        for name in files:
            path = os.path.join(directory, name)
            try:
                with safe_open(path, framework="np"):  # validates the header against the file size
                    pass
                with open(path, "rb") as f:
                    size = struct.unpack("<Q", f.read(8))[0]
                    self._headers[name] = (8 + size, json.loads(f.read(size)))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path} is not a readable safetensors file ({e}); "
                                      "re-download or re-convert it") from e
        if self.weight_map is None:
            self.weight_map = {k: SINGLE_FILE for k in self._headers[SINGLE_FILE][1] if k != "__metadata__"}

    def _info(self, name: str) -> tuple[str, int, dict[str, Any]]:
        file = self.weight_map[name]
        start, header = self._headers[file]
        if name not in header:
            raise CheckpointError(f"{file} does not contain tensor {name} listed in {INDEX_FILE}; "
                                  "re-download the checkpoint")
        if header[name]["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"tensor {name} in {file} has unsupported dtype {header[name]['dtype']}")
        return file, start, header[name]

    def __getitem__(self, name: str) -> np.ndarray:
        """Reads one tensor with plain file reads (no memory map, so resident memory stays one tensor)."""
        file, start, info = self._info(name)
        begin, end = info["data_offsets"]
        buf = bytearray(end - begin)
        with open(os.path.join(self.directory, file), "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{file} is truncated at tensor {name}; re-download the checkpoint")
        return np.frombuffer(buf, _ST_DTYPES[info["dtype"]]).reshape(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, from the file headers only."""
        return {name: tuple(self._info(name)[2]["shape"]) for name in self.weight_map}

    def dtypes(self) -> dict[str, np.dtype]:
        """Name -> NumPy dtype, from the file headers only."""
        return {name: _ST_DTYPES[self._info(name)[2]["dtype"]] for name in self.weight_map}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """A tensor to be written: its name, dtype and shape (the bytes come later)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_safetensors(path: str, entries: Sequence[TensorEntry], produce: Callable[[str], np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes one safetensors file, producing and writing one tensor at a time.

    The header (names, dtypes, shapes, offsets) is computed from `entries` first,
    so memory holds one tensor, never the file.

    Args:
      path: the file to write.
      entries: the tensors, in file order.
      produce: name -> array of exactly the entry's dtype and shape.
      metadata: the `__metadata__` strings (default `{"format": "pt"}`, which transformers expects).

    Raises:
      CheckpointError: `produce` returned an array that does not match its entry.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for e in entries:
        if e.dtype not in _ST_NAMES:
            raise CheckpointError(f"tensor {e.name}: dtype {e.dtype} cannot be stored in safetensors")
        header[e.name] = {"dtype": _ST_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in entries:
            arr = np.ascontiguousarray(produce(e.name))
            if arr.dtype != e.dtype or arr.shape != e.shape:
                raise CheckpointError(f"tensor {e.name}: produced {arr.dtype}{list(arr.shape)}, "
                                      f"expected {e.dtype}{list(e.shape)}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))


def plan_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Splits entries, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_hf_shards(directory: str, entries: Sequence[TensorEntry], produce: Callable[[str], np.ndarray],
                    max_shard_bytes: int) -> dict[str, Any]:
    """Writes `model-0000N-of-0000M.safetensors` and `model.safetensors.index.json`, shard by shard.

    Args:
      directory: an existing output directory.
      entries: every tensor, in checkpoint order.
      produce: name -> array (called once per tensor, in order).
      max_shard_bytes: the shard size limit (as transformers' `max_shard_size`).

    Returns:
      The index JSON object that was written.
    """
    shards = plan_shards(entries, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), shard, produce)
        weight_map.update({e.name: name for e in shard})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return index
