"""The README's examples that run offline, run as written, so that the README cannot drift from the code."""

from __future__ import annotations

import pathlib
import re
import shlex
import shutil

from huggingface_hub import constants

from ling_jax.cli import plan as plan_cli
from ling_jax.cli import zoo as zoo_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    """The README's fenced code blocks of `language` ("" = untagged)."""
    blocks, current, tag = [], None, ""
    for line in README.splitlines():
        if line.startswith("```") and current is None:
            current, tag = [], line[3:].strip()
        elif line.startswith("```"):
            if tag == language:
                blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _block_with(language: str, text: str) -> str:
    found = [b for b in _blocks(language) if text in b]
    assert len(found) == 1, f"README has {len(found)} {language} blocks with {text!r}"
    return found[0]


def test_the_three_line_example_runs_on_a_hub_id(tmp_path, fixture_dir, monkeypatch):
    """`from_pretrained("inclusionAI/Ling-Coder-lite")` offline, against a Hub cache that holds the fixture under
    that id (laid out as the Hub client lays it out)."""
    code = _block_with("python", "ling_jax.from_pretrained(\"inclusionAI/")
    repo_id = re.search(r'from_pretrained\("([^"]+)"', code).group(1)
    commit = "0" * 40
    snapshot = tmp_path / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit
    shutil.copytree(fixture_dir, snapshot, ignore=shutil.ignore_patterns("golden*"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (1, 3 + 32)
    assert scope["model"].config.num_hidden_layers == 3  # the fixture, through the id


def test_python_m_ling_jax_prints_the_readme_table(capsys):
    assert zoo_cli.main([]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    start = README.index("`python -m ling_jax` prints this table:")
    table = [line for line in README[start:].split("\n\n")[1].splitlines() if line.startswith("|")]
    assert printed == table


def test_the_plan_example_prints_what_the_readme_shows(capsys):
    block = _block_with("bash", "python -m ling_jax.cli.plan --model ling_coder_lite --mesh fsdp=4,expert=8 \\")
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "ling_jax.cli.plan"]
    assert plan_cli.main(argv[3:]) == 0
    out = capsys.readouterr().out
    shown = _block_with("", "assumes: remat full")
    for line in shown.strip().splitlines():
        if line != "...":
            assert line in out, line
    assert "with `--remat none` the plan says 283.77 GiB, 299%" in README
    none = [a for a in argv[3:] if a not in ("--remat", "full")]
    assert plan_cli.main(none) == 0
    assert "total                                283.77 GiB   of 95.0 GiB HBM: DOES NOT FIT (299%)" in (
        capsys.readouterr().out)
