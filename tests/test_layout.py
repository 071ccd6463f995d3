"""The package layout: imports point down the layers, no import cycles, no module over 500 lines.

Read from the `ast` of every module (function-level imports included), so the
check sees what a lazy import would hide at run time.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("ling_jax", "pallas_kernels")
MAX_LINES = 500

# The rank of each part of the tree: a module may import modules of a lower rank and of its own part only.
# Parts of the same rank are siblings and do not import each other.
RANKS = {
    "pallas_kernels": 0,
    "ling_jax.config": 1,
    "ling_jax.command_line": 1,
    "ling_jax.zoo": 2,
    "ling_jax.model": 3,
    "ling_jax.data": 4,
    "ling_jax.io": 4,
    "ling_jax.train": 5,
    "ling_jax.inference": 5,
    "ling_jax.curation": 5,
    "ling_jax.evaluation": 6,  # generates through ling_jax.inference, then executes and scores
    "ling_jax.cli": 7,
    "ling_jax": 8,  # the public API (`__init__`, `__main__`, `report`)
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def part_of(module: str) -> str:
    """The longest key of `RANKS` that `module` lies in."""
    best = max((k for k in RANKS if module == k or module.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layout.py RANKS: add its package there")
    return best


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The first-party modules `module` imports (`from pkg import mod` counts as `pkg.mod` when that is a module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found - {module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    out = {}
    for name, path in mods.items():
        deps = set()
        for target in imports_of(name, path, known):
            while target not in known and "." in target:  # `from ling_jax.config import X` -> ling_jax.config
                target = target.rsplit(".", 1)[0]
            deps.add(target)
        out[name] = deps - {name}
    return out


def test_every_module_is_in_a_layer():
    for name in modules():
        part_of(name)


def test_imports_point_down_the_layers():
    bad = []
    for name, deps in graph().items():
        mine = part_of(name)
        for dep in sorted(deps):
            theirs = part_of(dep)
            if theirs != mine and RANKS[theirs] >= RANKS[mine]:
                bad.append(f"{name} imports {dep} ({theirs}, rank {RANKS[theirs]} >= {mine}, rank {RANKS[mine]})")
    assert not bad, "imports that point up or sideways:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack = stack + [node]
        for dep in sorted(g[node]):
            if state.get(dep) == 1:  # `dep` is on the stack: the path from it back to here is a cycle
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_checks_catch_what_they_are_for():
    """The graph sees function-level imports, and an upward import would be flagged."""
    g = graph()
    assert "ling_jax.config" in g["ling_jax.model.transformer"]
    assert RANKS[part_of("ling_jax.train.step")] > RANKS[part_of("ling_jax.model.transformer")]
    assert part_of("ling_jax.model.moe") == "ling_jax.model" and part_of("ling_jax") == "ling_jax"


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES}): split it by concept"
