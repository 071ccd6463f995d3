"""Import statements read from the tree-sitter AST of each of the 16 languages, and the names files declare.

`extract(language, text)` returns a `FileImports`: the imports of the file, each an `Import` of a `Style`
saying how `ling_jax.curation.resolve` maps it to files (a dotted module, a relative path, a package-
qualified name, ...), and the packages / namespaces the file declares (Java, Kotlin, Scala, C#, PHP). The
statements are found by AST queries, and the names are read from the nodes' fields; no regex reads source.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from ling_jax.curation import grammars
from ling_jax.curation.grammars import text_of


class Style(enum.Enum):
    """How an import names what it imports."""

    PY_MODULE = "py_module"  # `import a.b` / `from a.b import c`: value "a.b", names ("c",).
    PY_RELATIVE = "py_relative"  # `from ..a import b`: value "a", level 2, names ("b",).
    QUALIFIED = "qualified"  # Java / Kotlin / Scala `a.b.C` (names ("*",) for a wildcard).
    PATH = "path"  # A path relative to the importer (JS/TS, C/C++ "...", PHP require, Ruby, Shell).
    REQUIRE = "require"  # Ruby `require 'x'`: a path relative to a load path (suffix match).
    GO_PACKAGE = "go_package"  # Go import path; every file of the package's directory.
    RUST_MOD = "rust_mod"  # Rust `mod foo;`.
    RUST_USE = "rust_use"  # Rust `use crate::a::b` (value "crate::a::b", names the items of a use list).
    NAMESPACE = "namespace"  # C# `using A.B;`: every file declaring namespace A.B.
    PHP_USE = "php_use"  # PHP `use A\\B\\C;`.
    LUA_MODULE = "lua_module"  # Lua `require "a.b"`.
    SWIFT_MODULE = "swift_module"  # Swift `import M`: the files of module directory M.


@dataclasses.dataclass(frozen=True)
class Import:
    """One import of a file."""

    style: Style
    value: str
    level: int = 0
    names: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FileImports:
    """What a file imports and which packages / namespaces it declares."""

    imports: tuple[Import, ...]
    declares: tuple[str, ...] = ()


def _string(node) -> str | None:
    """The content of the first string literal under `node` (None if there is none)."""
    if node is None:
        return None
    if node.type in ("string_fragment", "string_content", "interpreted_string_literal_content"):
        return text_of(node)
    if node.type in ("string", "string_literal", "interpreted_string_literal", "raw_string_literal",
                     "encapsed_string"):
        inner = [c for c in node.named_children if c.type.endswith(("fragment", "content"))]
        return "".join(text_of(c) for c in inner) if inner else text_of(node)[1:-1]
    for child in node.named_children:
        found = _string(child)
        if found is not None:
            return found
    return None


def _python(node) -> list[Import]:
    def dotted(n) -> str:
        return text_of(n.child_by_field_name("name") if n.type == "aliased_import" else n)

    names = tuple(dotted(n) for n in node.children_by_field_name("name"))
    if node.type == "import_statement":
        return [Import(Style.PY_MODULE, n) for n in names]
    if any(c.type == "wildcard_import" for c in node.children):
        names = ("*",)
    module = node.child_by_field_name("module_name")
    if module is None:
        return []
    if module.type == "relative_import":
        prefix = next((c for c in module.named_children if c.type == "import_prefix"), None)
        path = next((c for c in module.named_children if c.type == "dotted_name"), None)
        level = len(text_of(prefix)) if prefix is not None else 0
        return [Import(Style.PY_RELATIVE, text_of(path) if path is not None else "", level, names)]
    return [Import(Style.PY_MODULE, text_of(module), 0, names)]


def _qualified(node) -> list[Import]:
    """Java / Kotlin / Scala imports."""
    wildcard = any(c.type in ("asterisk", "namespace_wildcard", "wildcard") or text_of(c) in ("*", "_")
                   for c in node.children)
    selectors = next((c for c in node.named_children if c.type == "namespace_selectors"), None)
    parts = [c for c in node.named_children if c.type in ("scoped_identifier", "qualified_identifier", "identifier")]
    if node.type == "import_declaration" and parts and all(p.type == "identifier" for p in parts):
        name = ".".join(text_of(p) for p in parts)  # Scala: `path: (identifier)` per component.
    elif parts:
        name = text_of(parts[0]).replace(" ", "")
    else:
        return []
    if selectors is not None:
        return [Import(Style.QUALIFIED, f"{name}.{text_of(s)}") for s in selectors.named_children
                if s.type == "identifier"]
    return [Import(Style.QUALIFIED, name, 0, ("*",) if wildcard else ())]


def _rust(node) -> list[Import]:
    if node.type == "mod_item":
        if node.child_by_field_name("body") is not None:
            return []
        return [Import(Style.RUST_MOD, text_of(node.child_by_field_name("name")))]
    arg = node.child_by_field_name("argument")
    if arg is None:
        return []
    if arg.type == "use_as_clause":
        arg = arg.child_by_field_name("path")
    if arg.type in ("scoped_use_list", "use_wildcard"):
        path = arg.child_by_field_name("path") if arg.type == "scoped_use_list" else arg.named_children[0]
        items = arg.child_by_field_name("list")
        names = tuple(text_of(c).split("::")[0] for c in items.named_children) if items is not None else ()
        return [Import(Style.RUST_USE, text_of(path) if path is not None else "", 0, names)]
    return [Import(Style.RUST_USE, text_of(arg))]


def _call_string(node, functions: tuple[str, ...], field: str) -> str | None:
    callee = node.child_by_field_name(field)
    if callee is None or text_of(callee) not in functions:
        return None
    return _string(node.child_by_field_name("arguments"))


def _javascript(node) -> list[Import]:
    if node.type == "call_expression":
        spec = _call_string(node, ("require", "import"), "function")
    else:
        spec = _string(node.child_by_field_name("source") or next(
            (c for c in node.named_children if c.type == "import_require_clause"), None))
    return [Import(Style.PATH, spec)] if spec else []


def _php(node) -> list[Import]:
    if node.type == "namespace_use_clause":
        name = next((c for c in node.named_children if c.type in ("qualified_name", "name")), None)
        return [Import(Style.PHP_USE, text_of(name).lstrip("\\"))] if name is not None else []
    spec = _string(node)
    return [Import(Style.PATH, spec)] if spec else []


def _ruby(node) -> list[Import]:
    method = node.child_by_field_name("method")
    kind = {"require_relative": Style.PATH, "require": Style.REQUIRE, "load": Style.PATH}.get(
        text_of(method) if method is not None else "")
    spec = _string(node.child_by_field_name("arguments")) if kind else None
    return [Import(kind, spec if spec.endswith(".rb") else spec + ".rb")] if spec else []


def _shell(node) -> list[Import]:
    name = node.child_by_field_name("name")
    if name is None or text_of(name) not in ("source", "."):
        return []
    args = node.children_by_field_name("argument")
    if not args:
        return []
    spec = _string(args[0]) if args[0].type != "word" else text_of(args[0])
    return [Import(Style.PATH, spec)] if spec else []


def _single(style: Style, reader: Callable) -> Callable:
    def handle(node) -> list[Import]:
        value = reader(node)
        return [Import(style, value)] if value else []
    return handle


# language -> (query capturing import statements as @i, handler of one captured node).
_HANDLERS: dict[str, tuple[str, Callable]] = {
    "python": ("(import_statement) @i (import_from_statement) @i", _python),
    "java": ("(import_declaration) @i", _qualified),
    "kotlin": ("(import) @i", _qualified),
    "scala": ("(import_declaration) @i", _qualified),
    "javascript": ("(import_statement) @i (export_statement) @i (call_expression) @i", _javascript),
    "typescript": ("(import_statement) @i (export_statement) @i (call_expression) @i", _javascript),
    "c": ("(preproc_include path: (string_literal) @i)", _single(Style.PATH, _string)),
    "cpp": ("(preproc_include path: (string_literal) @i)", _single(Style.PATH, _string)),
    "go": ("(import_spec path: (_) @i)", _single(Style.GO_PACKAGE, _string)),
    "rust": ("(mod_item) @i (use_declaration) @i", _rust),
    "csharp": ("(using_directive (qualified_name) @i) (using_directive (identifier) @i)",
               _single(Style.NAMESPACE, text_of)),
    "php": ("(namespace_use_clause) @i (require_expression) @i (require_once_expression) @i "
            "(include_expression) @i (include_once_expression) @i", _php),
    "ruby": ("(call) @i", _ruby),
    "lua": ("(function_call) @i", lambda n: [Import(Style.LUA_MODULE, s) for s in
                                             [_call_string(n, ("require",), "name")] if s]),
    "shell": ("(command) @i", _shell),
    "swift": ("(import_declaration (identifier) @i)", _single(Style.SWIFT_MODULE, text_of)),
}

# language -> query capturing the declared package / namespace names as @d.
_DECLARES = {
    "java": "(package_declaration (scoped_identifier) @d) (package_declaration (identifier) @d)",
    "kotlin": "(package_header (qualified_identifier) @d)",
    "scala": "(package_clause name: (package_identifier) @d)",
    "csharp": "(namespace_declaration name: (_) @d) (file_scoped_namespace_declaration name: (_) @d)",
    "php": "(namespace_definition name: (namespace_name) @d)",
}


def extract(language: str, text: str, tree=None) -> FileImports:
    """The imports and declarations of a file in `language` (one of `GRAMMAR_LANGUAGES`)."""
    tree = tree if tree is not None else grammars.parse(language, text)
    root = tree.root_node
    query, handle = _HANDLERS[language]
    found: list[Import] = []
    for _, node in grammars.captures(language, root, query):
        found += handle(node)
    declares = ()
    if language in _DECLARES:
        declares = tuple(dict.fromkeys(text_of(n).replace(" ", "").replace(".", "\\" if language == "php" else ".")
                                       for _, n in grammars.captures(language, root, _DECLARES[language])))
    return FileImports(tuple(dict.fromkeys(found)), declares)
