"""`ling_jax.io.atomic`: an output directory appears only when complete, and never over an input."""

from __future__ import annotations

import os

import pytest

from ling_jax.config import UserError
from ling_jax.io.atomic import OutputDirError, atomic_output_dir, check_output_dir


def _listing(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_written_under_a_temporary_name_and_renamed_on_success(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith("out.tmp-")
        (tmp_path / os.path.basename(tmp) / "weights.bin").write_bytes(b"\x01\x02\x03")
        assert not out.exists()  # nothing looks finished while writing
    assert _listing(tmp_path) == ["out"]
    assert (out / "weights.bin").read_bytes() == b"\x01\x02\x03"
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # as os.makedirs would, not mkdtemp's 0o700


def test_nothing_is_left_when_the_body_raises(tmp_path):
    out = tmp_path / "nested" / "out"
    with pytest.raises(RuntimeError, match="disk full"), atomic_output_dir(out) as tmp:
        (tmp_path / "nested" / os.path.basename(tmp) / "part").write_text("half")
        raise RuntimeError("disk full")
    assert _listing(tmp_path / "nested") == []


def test_an_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputDirError, match="already exists: pass --overwrite") as info, atomic_output_dir(out):
        pytest.fail("the body ran")
    assert isinstance(info.value, UserError) and isinstance(info.value, FileExistsError)
    assert str(out) in str(info.value)
    assert _listing(out) == ["old.txt"]


def test_overwrite_replaces_the_output_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp_path / os.path.basename(tmp) / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["old.txt"]
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp_path / os.path.basename(tmp) / "new.txt").write_text("new")
    assert _listing(tmp_path) == ["out"] and _listing(out) == ["new.txt"]  # no OUT.old-* left either


def test_an_output_that_is_or_holds_an_input_is_refused(tmp_path):
    src = tmp_path / "models" / "src"
    src.mkdir(parents=True)
    for out in (src, tmp_path / "models", tmp_path):
        with pytest.raises(OutputDirError, match=f"output directory {out} would replace the input {src}"):
            check_output_dir(out, overwrite=True, inputs=[src])
    with pytest.raises(OutputDirError, match="would replace the input"):
        check_output_dir(tmp_path / "models" / "." / "src", overwrite=True, inputs=[src])  # same place, other spelling
    check_output_dir(tmp_path / "models" / "sr", overwrite=False, inputs=[src])  # a name prefix is not a parent
    check_output_dir(src / "out", overwrite=False, inputs=[src])  # inside an input is fine
