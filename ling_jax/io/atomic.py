"""Output directories that appear only when complete: write into `OUT.tmp-XXXX`, rename at the end.

Every writer of a directory (the converters of `ling_jax.io.convert`, so
`convert_weights.py`) goes through `atomic_output_dir`, so an interrupted run
(even `kill -9`) never leaves a directory that looks finished; `check_output_dir`
refuses an output that exists (without `overwrite`) or would replace an input,
before any work is done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

from ling_jax.config import UserError


class OutputDirError(UserError, FileExistsError):
    """An output directory that may not be written: it exists (without `overwrite`) or is or holds an input."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary sibling `OUT.tmp-XXXX` to write into, renamed to `out` on success.

    On an exception the temporary directory is removed; after a kill it stays
    under its temporary name. An existing `out` is replaced only with `overwrite`.

    Raises:
      OutputDirError: `out` exists and `overwrite` is false.
    """
    out = os.path.abspath(os.fspath(out))
    check_output_dir(out, overwrite)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=parent)
            os.rename(out, os.path.join(old, "replaced"))
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(os.path.join(old, "replaced"), out)  # put the old output back
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Refuses an existing `out` without `overwrite`, and an `out` that is or contains an input.

    Raises:
      OutputDirError: `out` exists and `overwrite` is false, or `out` is one of `inputs` or a parent of one.
    """
    out = os.path.realpath(out)
    for src in inputs:
        src = os.path.realpath(src)
        if src == out or src.startswith(out + os.sep):
            raise OutputDirError(f"output directory {out} would replace the input {src}: choose another --out")
    if os.path.lexists(out) and not overwrite:
        raise OutputDirError(f"output directory {out} already exists: pass --overwrite to replace it, "
                              "or choose another --out")

