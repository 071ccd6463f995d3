"""Resolving imports to files of the same repository, by path and by each language's package conventions.

`RepoIndex(files)` indexes a repository's files (path -> language, declared packages); `resolve(index,
importer, imp)` returns the paths an `Import` of file `importer` refers to (empty: unresolvable, e.g. a
third-party package). Conventions: Python packages (`a/b.py`, `a/b/__init__.py`, relative imports by level,
any source root), Java / Kotlin / Scala packages (declared package + file name, wildcard = the package),
JS/TS relative paths with extension and `index` resolution, Go packages by directory, C/C++ `#include "..."`
(importer's directory, then the repository, then a path suffix), Rust `mod` / `use crate|self|super::`,
C# namespaces (every file declaring it), PHP `require` paths and `use` names (namespace + file, PSR-4
paths), Ruby `require_relative` / `require`, Lua `require` (`a/b.lua`, `a/b/init.lua`), Shell `source`.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from collections.abc import Iterable

from ling_jax.curation.imports import FileImports, Import, Style

_JS_EXTS = (".ts", ".tsx", ".d.ts", ".js", ".jsx", ".mjs", ".cjs")
_QUALIFIED_EXTS = (".java", ".kt", ".kts", ".scala", ".sc")


class RepoIndex:
    """The files of one repository, for resolution."""

    def __init__(self, files: dict[str, FileImports]):
        self.paths = set(files)
        self.suffixes: dict[str, list[str]] = defaultdict(list)  # "b/c.py" -> every path ending so.
        self.dirs: dict[str, list[str]] = defaultdict(list)  # directory -> its files.
        self.packages: dict[str, list[str]] = defaultdict(list)  # declared package / namespace -> files.
        for path in sorted(files):
            parts = path.split("/")
            for k in range(1, len(parts) + 1):
                self.suffixes["/".join(parts[-k:])].append(path)
            self.dirs[posixpath.dirname(path)].append(path)
            for name in files[path].declares:
                self.packages[name].append(path)

    def first(self, candidates: Iterable[str]) -> list[str]:
        """The first candidate path that is a file of the repository (as a list of at most one)."""
        for c in candidates:
            c = posixpath.normpath(c).lstrip("/") if c else c
            if c in self.paths:
                return [c]
        return []

    def by_suffix(self, suffix: str) -> list[str]:
        """The files whose path ends with `suffix` (whole components), if exactly one: else the shortest."""
        found = self.suffixes.get(suffix.strip("/"), [])
        return sorted(found, key=lambda p: (len(p), p))[:1]


def _python(index: RepoIndex, importer: str, imp: Import) -> list[str]:
    if imp.style is Style.PY_RELATIVE:
        base = posixpath.dirname(importer)
        for _ in range(imp.level - 1):
            base = posixpath.dirname(base)
        module = posixpath.join(base, *imp.value.split(".")) if imp.value else base
        found = []
        for name in imp.names:
            if name != "*":
                found += index.first([f"{module}/{name}.py", f"{module}/{name}/__init__.py"])
        return found or index.first([f"{module}.py", f"{module}/__init__.py"])
    module = imp.value.replace(".", "/")
    found = []
    for name in imp.names:
        if name != "*":
            found += (index.by_suffix(f"{module}/{name}.py") or index.by_suffix(f"{module}/{name}/__init__.py"))
    return found or index.by_suffix(f"{module}.py") or index.by_suffix(f"{module}/__init__.py")


def _qualified(index: RepoIndex, importer: str, imp: Import) -> list[str]:
    parts = imp.value.split(".")
    if imp.names == ("*",):
        return sorted(index.packages.get(imp.value, [])) or [
            p for p in index.dirs.get(_dir_by_suffix(index, "/".join(parts)), [])
            if p.endswith(_QUALIFIED_EXTS)]
    for k in range(len(parts), 1, -1):  # `a.b.C.member` -> try a.b.C, then a.b.C as a file ...
        package, name = ".".join(parts[: k - 1]), parts[k - 1]
        hits = [p for p in index.packages.get(package, []) if posixpath.splitext(posixpath.basename(p))[0] == name]
        hits = hits or [h for ext in _QUALIFIED_EXTS for h in index.by_suffix("/".join(parts[:k]) + ext)]
        if hits:
            return sorted(hits)[:1]
    return []


def _dir_by_suffix(index: RepoIndex, suffix: str) -> str | None:
    """The shortest directory whose path ends with `suffix` (whole components)."""
    suffix = suffix.strip("/")
    found = [d for d in index.dirs if d == suffix or d.endswith("/" + suffix)]
    return min(found, key=lambda d: (len(d), d)) if found else None


def _path(index: RepoIndex, importer: str, imp: Import, exts: tuple[str, ...] = ()) -> list[str]:
    here = posixpath.dirname(importer)
    spec = imp.value
    bases = [posixpath.join(here, spec.lstrip("/")), spec.lstrip("/")] if not spec.startswith(".") else [
        posixpath.join(here, spec)]
    for base in bases:
        found = index.first([base, *(base + e for e in exts), *(f"{base}/index{e}" for e in exts)])
        if found:
            return found
    return [] if spec.startswith(".") else index.by_suffix(spec)


def _javascript(index: RepoIndex, importer: str, imp: Import) -> list[str]:
    if not imp.value.startswith((".", "/")):
        return []  # A package of node_modules.
    return _path(index, importer, imp, _JS_EXTS)


def _go(index: RepoIndex, importer: str, imp: Import) -> list[str]:
    parts = imp.value.split("/")
    for k in range(len(parts)):  # The longest suffix of the import path that is a directory.
        d = _dir_by_suffix(index, "/".join(parts[k:]))
        if d is not None:
            return [p for p in index.dirs[d] if p.endswith(".go") and not p.endswith("_test.go")]
    return []


def _rust_module_dir(importer: str) -> str:
    """The directory holding the submodules of the module file `importer`."""
    here, name = posixpath.split(importer)
    return here if name in ("mod.rs", "lib.rs", "main.rs") else posixpath.join(here, posixpath.splitext(name)[0])


def _rust_file(index: RepoIndex, base: str, parts: list[str]) -> list[str]:
    for k in range(len(parts), 0, -1):  # `a::b::item` -> a/b.rs, a/b/mod.rs, then a.rs, a/mod.rs.
        stem = posixpath.join(base, *parts[:k])
        found = index.first([stem + ".rs", stem + "/mod.rs"])
        if found:
            return found
    return []


def _rust(index: RepoIndex, importer: str, imp: Import) -> list[str]:
    if imp.style is Style.RUST_MOD:
        return index.first([posixpath.join(_rust_module_dir(importer), imp.value + ".rs"),
                            posixpath.join(_rust_module_dir(importer), imp.value, "mod.rs")])
    parts = [p for p in imp.value.split("::") if p]
    if not parts:
        return []
    if parts[0] == "crate":
        root = posixpath.dirname(importer)
        while root and not index.first([f"{root}/lib.rs", f"{root}/main.rs"]):
            root = posixpath.dirname(root)
        base, parts = root, parts[1:]
    elif parts[0] in ("self", "super"):
        base = _rust_module_dir(importer)
        while parts and parts[0] == "super":
            base, parts = posixpath.dirname(base), parts[1:]
        parts = parts[1:] if parts and parts[0] == "self" else parts
    else:
        return []
    found = [f for name in imp.names for f in _rust_file(index, base, [*parts, name])]
    return sorted(set(found)) or _rust_file(index, base, parts)


def _php(index: RepoIndex, importer: str, imp: Import) -> list[str]:
    if imp.style is Style.PATH:
        return _path(index, importer, imp)
    namespace, _, name = imp.value.rpartition("\\")
    hits = [p for p in index.packages.get(namespace, []) if posixpath.basename(p) == name + ".php"]
    parts = imp.value.split("\\")
    for k in range(len(parts)):
        hits = hits or index.by_suffix("/".join(parts[k:]) + ".php")
    return sorted(hits)[:1]


def _lua(index: RepoIndex, importer: str, imp: Import) -> list[str]:
    module = imp.value.replace(".", "/")
    return index.by_suffix(module + ".lua") or index.by_suffix(module + "/init.lua")


def _swift(index: RepoIndex, importer: str, imp: Import) -> list[str]:
    d = _dir_by_suffix(index, imp.value)
    return sorted(p for p in index.paths if d is not None and p.startswith(d + "/") and p.endswith(".swift"))


_RESOLVERS = {
    Style.PY_MODULE: _python, Style.PY_RELATIVE: _python, Style.QUALIFIED: _qualified,
    Style.PATH: _path, Style.REQUIRE: lambda i, f, m: i.by_suffix(m.value),
    Style.GO_PACKAGE: _go, Style.RUST_MOD: _rust, Style.RUST_USE: _rust,
    Style.NAMESPACE: lambda i, f, m: sorted(i.packages.get(m.value, [])),
    Style.PHP_USE: _php, Style.LUA_MODULE: _lua, Style.SWIFT_MODULE: _swift,
}


def resolve(index: RepoIndex, importer: str, imp: Import, language: str) -> list[str]:
    """The files of the repository that import `imp` of file `importer` refers to (never the importer)."""
    if language in ("javascript", "typescript") and imp.style is Style.PATH:
        found = _javascript(index, importer, imp)
    elif language == "php":
        found = _php(index, importer, imp)
    else:
        found = _RESOLVERS[imp.style](index, importer, imp)
    return [f for f in found if f != importer]


def dependency_graph(files: dict[str, tuple[str, FileImports]]) -> dict[str, set[str]]:
    """`path -> the paths it imports` for the files `path -> (language, imports)` of one repository."""
    index = RepoIndex({p: fi for p, (_, fi) in files.items()})
    return {path: {d for imp in fi.imports for d in resolve(index, path, imp, lang)}
            for path, (lang, fi) in files.items()}
