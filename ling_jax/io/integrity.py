"""Checkpoint integrity: a manifest of every file's size, written once a checkpoint is complete.

A checkpoint can be damaged after it was committed: a file truncated or deleted by a storage
fault or by a person. Orbax only finds out deep inside TensorStore, with an error that names a
chunk, or not at all (a truncated chunk can read as garbage). So each complete checkpoint gets a
`MANIFEST` (`ling_manifest.json`: relative path -> size in bytes of every file under it), and
readers call `check(directory)` first: a missing file or one whose size differs is reported by
name (`DamagedCheckpointError`), before any tensor is read.

Sizes catch truncation and deletion, the faults storage and people cause, at the cost of one
`stat` per file; they do not catch a flipped bit inside a file of the right size (Orbax's OCDBT
chunks carry no checksum either).
"""

from __future__ import annotations

import json
import os
import pathlib

from ling_jax.config import UserError

__all__ = ["MANIFEST", "DamagedCheckpointError", "check", "damaged_files", "find_manifest", "write_manifest"]

MANIFEST = "ling_manifest.json"


class DamagedCheckpointError(UserError):
    """A checkpoint whose files are missing or truncated (the message lists them)."""


def _sizes(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}")}


def write_manifest(directory: str | os.PathLike) -> pathlib.Path:
    """Records the size of every file under `directory` in `directory/MANIFEST` (atomically); returns its path."""
    root = pathlib.Path(directory)
    path, tmp = root / MANIFEST, root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": _sizes(root)}, indent=0))
    os.replace(tmp, path)
    return path


def find_manifest(directory: str | os.PathLike) -> pathlib.Path | None:
    """The manifest that covers `directory`: its own, or that of the checkpoint it lies in (up to 2 levels)."""
    here = pathlib.Path(directory).resolve()
    for candidate in (here, here.parent, here.parent.parent):
        if (candidate / MANIFEST).is_file():
            return candidate / MANIFEST
    return None


def damaged_files(directory: str | os.PathLike) -> list[str]:
    """What is wrong with the checkpoint covering `directory` ([] if intact or if it has no manifest)."""
    manifest = find_manifest(directory)
    if manifest is None:
        return []
    root = manifest.parent
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return [f"{manifest} is unreadable"]
    found = []
    for rel, size in expected.items():
        path = root / rel
        if not path.is_file():
            found.append(f"{path} is missing")
        elif (actual := path.stat().st_size) != size:
            found.append(f"{path} has {actual} bytes, {size} when written")
    return found


def check(directory: str | os.PathLike) -> None:
    """Raises `DamagedCheckpointError` naming the missing or truncated files of the checkpoint at `directory`."""
    if problems := damaged_files(directory):
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise DamagedCheckpointError(f"the checkpoint {directory} is damaged: {shown}. Restore it from a copy, "
                                     "or use an earlier checkpoint")
