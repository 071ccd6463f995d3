"""Language identification from a file's name and extension, and what the other operators need to know of each.

`identify(path)` names the language of a file (`None` when the table does not know it). Every language has a
`Kind` (programming, data, markup, prose), its comment syntax (for the comment ratio and the effective lines
of code), and, for the 16 languages of `GRAMMAR_LANGUAGES`, the tree-sitter grammar that parses it.
The table covers the 60 most common programming languages of The Stack and the data and markup formats.
"""

from __future__ import annotations

import dataclasses
import enum
import posixpath


class Kind(enum.Enum):
    """What a language is: source-code rules apply to programming languages, StarCoder's size limits to data."""

    PROGRAMMING = "programming"
    DATA = "data"
    MARKUP = "markup"
    PROSE = "prose"


@dataclasses.dataclass(frozen=True)
class Language:
    """One language of the table."""

    name: str  # The canonical name used in records, reports and the config (`languages`).
    kind: Kind
    extensions: tuple[str, ...]  # Lower-case, with the dot.
    filenames: tuple[str, ...] = ()  # Exact file names (Makefile, Dockerfile, ...).
    line_comments: tuple[str, ...] = ()  # Prefixes that start a comment running to the end of the line.
    block_comments: tuple[tuple[str, str], ...] = ()  # (open, close) pairs.


_C = (("//",), (("/*", "*/"),))  # C-family comment syntax.
_HASH = (("#",), ())
_DASH = (("--",), ())
_SEMI = ((";",), ())
_PCT = (("%",), ())
_XML = ((), (("<!--", "-->"),))


def _lang(name: str, kind: Kind, exts: str, comments: tuple = ((), ()), filenames: str = "") -> Language:
    return Language(name, kind, tuple(exts.split()), tuple(filenames.split()), *comments)


P, D, M, T = Kind.PROGRAMMING, Kind.DATA, Kind.MARKUP, Kind.PROSE
LANGUAGES: tuple[Language, ...] = (
    _lang("python", P, ".py .pyi .pyw", (("#",), (('"""', '"""'), ("'''", "'''")))),
    _lang("java", P, ".java", _C),
    _lang("javascript", P, ".js .mjs .cjs .jsx", _C),
    _lang("typescript", P, ".ts .tsx .mts .cts", _C),
    _lang("c", P, ".c .h", _C),
    _lang("cpp", P, ".cc .cpp .cxx .c++ .hh .hpp .hxx .h++ .ipp .inl", _C),
    _lang("csharp", P, ".cs", _C),
    _lang("go", P, ".go", _C),
    _lang("rust", P, ".rs", _C),
    _lang("php", P, ".php .phtml", (("//", "#"), (("/*", "*/"),))),
    _lang("ruby", P, ".rb .rake .gemspec", (("#",), (("=begin", "=end"),)), "Rakefile Gemfile"),
    _lang("kotlin", P, ".kt .kts", _C),
    _lang("scala", P, ".scala .sc", _C),
    _lang("swift", P, ".swift", _C),
    _lang("shell", P, ".sh .bash .zsh .ksh", _HASH),
    _lang("lua", P, ".lua", (("--",), (("--[[", "]]"),))),
    _lang("perl", P, ".pl .pm .t", _HASH),
    _lang("r", P, ".r .rmd", _HASH),
    _lang("objective-c", P, ".m .mm", _C),
    _lang("dart", P, ".dart", _C),
    _lang("haskell", P, ".hs .lhs", (("--",), (("{-", "-}"),))),
    _lang("elixir", P, ".ex .exs", _HASH),
    _lang("erlang", P, ".erl .hrl", _PCT),
    _lang("clojure", P, ".clj .cljs .cljc .edn", _SEMI),
    _lang("fsharp", P, ".fs .fsi .fsx", (("//",), (("(*", "*)"),))),
    _lang("ocaml", P, ".ml .mli", ((), (("(*", "*)"),))),
    _lang("julia", P, ".jl", (("#",), (("#=", "=#"),))),
    _lang("matlab", P, ".matlab", _PCT),
    _lang("groovy", P, ".groovy .gradle", _C),
    _lang("powershell", P, ".ps1 .psm1 .psd1", (("#",), (("<#", "#>"),))),
    _lang("visual-basic", P, ".vb .bas .vbs", (("'",), ())),
    _lang("fortran", P, ".f .f90 .f95 .f03 .for", (("!",), ())),
    _lang("pascal", P, ".pas .pp .dpr", (("//",), (("{", "}"), ("(*", "*)")))),
    _lang("assembly", P, ".asm .s .nasm", _SEMI),
    _lang("sql", P, ".sql", (("--",), (("/*", "*/"),))),
    _lang("zig", P, ".zig", (("//",), ())),
    _lang("nim", P, ".nim .nims", _HASH),
    _lang("crystal", P, ".cr", _HASH),
    _lang("d", P, ".d", _C),
    _lang("elm", P, ".elm", (("--",), (("{-", "-}"),))),
    _lang("common-lisp", P, ".lisp .lsp .cl", _SEMI),
    _lang("scheme", P, ".scm .ss", _SEMI),
    _lang("racket", P, ".rkt", _SEMI),
    _lang("prolog", P, ".pro .prolog", (("%",), (("/*", "*/"),))),
    _lang("ada", P, ".adb .ads", _DASH),
    _lang("cobol", P, ".cob .cbl .cpy", (("*>",), ())),
    _lang("tcl", P, ".tcl", _HASH),
    _lang("vhdl", P, ".vhd .vhdl", _DASH),
    _lang("verilog", P, ".v .sv .svh", _C),
    _lang("solidity", P, ".sol", _C),
    _lang("cuda", P, ".cu .cuh", _C),
    _lang("vue", P, ".vue", _C),
    _lang("svelte", P, ".svelte", _C),
    _lang("makefile", P, ".mk .mak", _HASH, "Makefile makefile GNUmakefile"),
    _lang("dockerfile", P, ".dockerfile", _HASH, "Dockerfile"),
    _lang("cmake", P, ".cmake", _HASH, "CMakeLists.txt"),
    _lang("batchfile", P, ".bat .cmd", (("REM", "::"), ())),
    _lang("awk", P, ".awk", _HASH),
    _lang("coffeescript", P, ".coffee", _HASH),
    _lang("haxe", P, ".hx", _C),
    _lang("smalltalk", P, ".st", ((), (('"', '"'),))),
    _lang("apex", P, ".cls .trigger", _C),
    _lang("json", D, ".json .jsonc .geojson .json5"),
    _lang("yaml", D, ".yml .yaml", _HASH),
    _lang("toml", D, ".toml", _HASH),
    _lang("xml", D, ".xml .xsd .xsl .xslt .plist .csproj .pom", _XML),
    _lang("csv", D, ".csv .tsv"),
    _lang("ini", D, ".ini .cfg .conf .properties", ((";", "#"), ())),
    _lang("protocol-buffer", D, ".proto", _C),
    _lang("graphql", D, ".graphql .gql", _HASH),
    _lang("html", M, ".html .htm .xhtml", _XML),
    _lang("css", M, ".css", ((), (("/*", "*/"),))),
    _lang("scss", M, ".scss .sass .less", _C),
    _lang("markdown", T, ".md .markdown .mdx", _XML),
    _lang("restructuredtext", T, ".rst", ((".. ",), ())),
    _lang("tex", T, ".tex .sty .bib", _PCT),
    _lang("text", T, ".txt"),
)

# The languages with a tree-sitter grammar (syntax check, imports, code-comment pairs).
GRAMMAR_LANGUAGES = ("python", "java", "javascript", "typescript", "c", "cpp", "csharp", "go", "rust", "php",
                     "ruby", "kotlin", "scala", "swift", "shell", "lua")

BY_NAME = {lang.name: lang for lang in LANGUAGES}
_BY_FILENAME = {f: lang for lang in LANGUAGES for f in lang.filenames}
_BY_EXTENSION = {e: lang for lang in LANGUAGES for e in lang.extensions}


def identify(path: str) -> Language | None:
    """The language of the file at `path` (a POSIX path inside its repository), from its name or extension."""
    name = posixpath.basename(path)
    if name in _BY_FILENAME:
        return _BY_FILENAME[name]
    ext = posixpath.splitext(name)[1].lower()
    return _BY_EXTENSION.get(ext)
