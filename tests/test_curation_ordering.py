"""ling_jax.curation.imports / resolve / ordering: repositories in 15 languages with known import graphs."""

from __future__ import annotations

import random

import pytest

from ling_jax.curation.languages import identify
from ling_jax.curation.ordering import OrderingSettings, dependency_order, order_repository, repository_text
from ling_jax.curation.records import record

REPOS = {
    "python_chain_self_unresolvable": ({
        "pkg/__init__.py": "VERSION = 1\n",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "from pkg.c import thing\n",
        "pkg/c.py": "import numpy\nimport pkg.c\nthing = 1\n",  # third-party and itself: no edges
    }, ["pkg/__init__.py", "pkg/c.py", "pkg/b.py", "pkg/a.py"]),
    "java_diamond": ({
        "src/com/x/App.java": "package com.x;\nimport com.x.util.Left;\nimport com.x.util.Right;\nclass App {}\n",
        "src/com/x/util/Left.java": "package com.x.util;\nimport com.x.core.Base;\nclass Left {}\n",
        "src/com/x/util/Right.java": "package com.x.util;\nimport com.x.core.*;\nclass Right {}\n",
        "src/com/x/core/Base.java": "package com.x.core;\nclass Base {}\n",
    }, ["src/com/x/core/Base.java", "src/com/x/util/Left.java", "src/com/x/util/Right.java", "src/com/x/App.java"]),
    "javascript_cycle_and_index": ({
        "a.js": "import b from './b';\n", "b.js": "const c = require('./c');\n", "c.js": "import {a} from './a.js';\n",
        "main.js": "import lib from './lib';\nimport React from 'react';\n", "lib/index.js": "export default 1;\n",
    }, ["lib/index.js", "main.js", "a.js", "c.js", "b.js"]),
    "typescript_paths": ({
        "src/app.ts": "import { User } from './models/user';\nexport const u: User = {name: ''};\n",
        "src/models/user.ts": "export interface User { name: string }\n",
    }, ["src/models/user.ts", "src/app.ts"]),
    "go_packages": ({
        "main.go": 'package main\nimport "example.com/m/util"\nfunc main() { util.F() }\n',
        "util/u.go": 'package util\nimport (\n "fmt"\n "example.com/m/base"\n)\nfunc F() { fmt.Println(base.B) }\n',
        "base/b.go": "package base\nconst B = 1\n",
    }, ["base/b.go", "util/u.go", "main.go"]),
    "c_includes_ties": ({
        "main.c": '#include <stdio.h>\n#include "util.h"\nint main(void) { return util(); }\n',
        "util.c": '#include "util.h"\nint util(void) { return 0; }\n', "util.h": "int util(void);\n",
    }, ["util.h", "main.c", "util.c"]),
    "cpp_subdir": ({
        "src/engine.cpp": '#include "include/engine.hpp"\nint Engine::run() { return 0; }\n',
        "src/include/engine.hpp": "struct Engine { int run(); };\n",
    }, ["src/include/engine.hpp", "src/engine.cpp"]),
    "rust_mod_use": ({
        "src/main.rs": "mod net;\nmod util;\nuse crate::net::tcp;\nfn main() {}\n",
        "src/net/mod.rs": "pub mod tcp;\n", "src/net/tcp.rs": "use crate::util::helper;\npub fn t() {}\n",
        "src/util.rs": "pub fn helper() {}\n",
    }, ["src/util.rs", "src/net/tcp.rs", "src/net/mod.rs", "src/main.rs"]),
    "csharp_namespaces": ({
        "Program.cs": "using System;\nusing App.Models;\nclass Program { static void Main() {} }\n",
        "Models/User.cs": "namespace App.Models { class User {} }\n",
    }, ["Models/User.cs", "Program.cs"]),
    "php_require_use": ({
        "index.php": "<?php\nrequire_once 'lib/db.php';\nuse App\\Models\\User;\n",
        "src/Models/User.php": "<?php\nnamespace App\\Models;\nclass User {}\n", "lib/db.php": "<?php\n$x = 1;\n",
    }, ["lib/db.php", "src/Models/User.php", "index.php"]),
    "ruby_require_relative": ({
        "lib/app.rb": "require_relative 'helpers/fmt'\nrequire 'json'\nputs 1\n", "lib/helpers/fmt.rb": "X = 1\n",
    }, ["lib/helpers/fmt.rb", "lib/app.rb"]),
    "kotlin_packages": ({
        "app/Main.kt": "package app\nimport app.data.Repo\nfun main() {}\n",
        "app/data/Repo.kt": "package app.data\nclass Repo\n",
    }, ["app/data/Repo.kt", "app/Main.kt"]),
    "scala_packages": ({
        "src/a/Main.scala": "package a\nimport a.b.{Helper, Other}\nobject Main\n",
        "src/a/b/Helper.scala": "package a.b\nobject Helper\n",
    }, ["src/a/b/Helper.scala", "src/a/Main.scala"]),
    "swift_modules": ({
        "Sources/App/main.swift": "import Foundation\nimport Core\nprint(1)\n",
        "Sources/Core/Model.swift": "struct Model {}\n",
    }, ["Sources/Core/Model.swift", "Sources/App/main.swift"]),
    "lua_require": ({
        "main.lua": 'local s = require("lib.strings")\n', "lib/strings.lua": 'local c = require "lib.core"\n',
        "lib/core.lua": "return {}\n",
    }, ["lib/core.lua", "lib/strings.lua", "main.lua"]),
    "shell_source": ({
        "run.sh": "#!/bin/sh\nsource ./env.sh\necho $X\n", "env.sh": "X=1\n",
    }, ["env.sh", "run.sh"]),
}


def order_of(files: dict[str, str]):
    recs = [record("owner/repo", p, t, language=identify(p).name) for p, t in files.items()]
    random.Random(0).shuffle(recs)
    return list(order_repository(("owner/repo", recs), OrderingSettings()))


@pytest.mark.parametrize("name", sorted(REPOS))
def test_repositories_are_ordered_by_their_import_graph(name):
    files, expected = REPOS[name]
    (doc,) = order_of(files)
    assert doc["paths"] == expected
    assert doc["kind"] == "repository" and doc["id"] == "owner/repo"


def test_repository_document_format():
    files, _ = REPOS["c_includes_ties"]
    (doc,) = order_of(files)
    assert doc["text"] == ("<repo_name>owner/repo\n<file_sep>util.h\nint util(void);\n"
                           "<file_sep>main.c\n" + files["main.c"] + "<file_sep>util.c\n" + files["util.c"])
    custom = OrderingSettings(repo_token="# repo: ", file_token="# file: ")
    assert repository_text("r", [record("r", "x.py", "x = 1")], custom) == "# repo: r\n# file: x.py\nx = 1\n"


def test_repository_without_a_grammar_language_falls_back_to_files():
    recs = [record("r", p, "text\n", language=identify(p).name) for p in ("README.md", "data.json")]
    out = list(order_repository(("r", recs), OrderingSettings()))
    assert [r["kind"] for r in out] == ["file", "file"] and [r["path"] for r in out] == ["README.md", "data.json"]


def test_dependency_order_cycle_ties_and_self_import():
    assert dependency_order({"b": set(), "a": set(), "c": set()}) == ["a", "b", "c"]
    assert dependency_order({"x": {"y"}, "y": {"x"}}) == ["x", "y"]  # cycle broken at the smallest path
    assert dependency_order({"s": {"s"}, "t": {"s"}}) == ["s", "t"]  # importing itself is no edge
    assert dependency_order({"a": {"missing"}, "b": {"a"}}) == ["a", "b"]


@pytest.mark.parametrize("seed", range(40))
def test_random_dags_put_dependencies_first_uniquely_and_stably(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 30)
    names = [f"f{rng.randrange(10**6):06d}_{i}" for i in range(n)]
    rank = names[:]
    rng.shuffle(rank)  # A hidden topological order: edges only point to earlier files.
    deps = {f: {d for d in rank[: rank.index(f)] if rng.random() < 0.2} for f in names}
    order = dependency_order(deps)
    assert sorted(order) == sorted(names)
    pos = {f: i for i, f in enumerate(order)}
    assert all(pos[d] < pos[f] for f in names for d in deps[f])
    shuffled = list(deps.items())
    rng.shuffle(shuffled)
    assert dependency_order(dict(shuffled)) == order  # Stable: insertion order does not matter.
    # Unique: at every step the placed file is the smallest path among those with all dependencies placed.
    placed: set[str] = set()
    for f in order:
        ready = sorted(g for g in names if g not in placed and deps[g] <= placed)
        assert f == ready[0]
        placed.add(f)
