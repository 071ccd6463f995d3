"""ling_jax.curation end to end: a multi-language corpus curated on Beam, then train.py trains on the output.

Also: the inputs (repositories, The Stack jsonl / parquet, text jsonl), bad files dropped and counted, and
bad configs stopped before any work with a message naming the field.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from configs import curate_code
from ling_jax.curation.pipeline import run, settings_from_config
from ling_jax.curation.settings import CurationConfigError
from ling_jax.io.atomic import OutputDirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "keyword.py", "colorsys.py")


def make_corpus(root):
    """Repositories in several languages, a duplicate, and bad files of every kind."""
    lib = root / "repos" / "stdlib"
    lib.mkdir(parents=True)
    for name in STDLIB:
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), lib / name)
    (lib / "uses.py").write_text("import textwrap\nfrom heapq import heappush\n\n\ndef wrap(s):\n"
                                 "    \"\"\"Wrap the text to forty columns and return the lines.\"\"\"\n"
                                 "    return textwrap.wrap(s, 40)\n")
    go = root / "repos" / "gosvc"
    (go / "util").mkdir(parents=True)
    (go / "main.go").write_text('package main\n\nimport "example.com/svc/util"\n\nfunc main() {\n'
                                '\tutil.Hello("world")\n}\n')
    (go / "util" / "hello.go").write_text('package util\n\nimport "fmt"\n\n// Hello greets the person by name '
                                          'on standard output.\nfunc Hello(name string) {\n\tfmt.Println("hi", name)'
                                          '\n}\n')
    js = root / "repos" / "webapp"
    js.mkdir()
    (js / "app.js").write_text("import { add } from './math';\nconsole.log(add(1, 2));\n")
    (js / "math.js").write_text("export function add(a, b) {\n  return a + b;\n}\n")
    (js / "bad.js").write_text("function broken( {\n  return 1 +;\n")  # syntax error
    (js / "README.md").write_text("# webapp\n\nA tiny app that adds two numbers together.\n")
    (js / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")  # binary
    (js / "latin1.js").write_bytes("var s = 'caf\xe9';\n".encode("latin-1"))  # undecodable
    (js / "huge.js").write_text("var x = 1;\n" * 200_000)  # over max_file_bytes
    os.symlink("/etc/hostname", js / "outside.js")  # leaves the repository
    dup = root / "repos" / "zfork"  # sorts after stdlib: stdlib/textwrap.py survives
    dup.mkdir()
    shutil.copy(lib / "textwrap.py", dup / "textwrap.py")  # exact duplicate
    c = root / "repos" / "clib"
    c.mkdir()
    (c / "list.h").write_text("struct node { int value; struct node *next; };\nint length(struct node *n);\n")
    (c / "list.c").write_text('#include "list.h"\n\n/* Count the nodes of a linked list, iteratively. */\n'
                              "int length(struct node *n) {\n  int k = 0;\n  for (; n; n = n->next) k++;\n"
                              "  return k;\n}\n")
    return root / "repos"


def config(**fields):
    c = curate_code.get_config()
    c.running_mode = "in_memory"
    c.update_from_flattened_dict(fields)
    return c


def records(directory):
    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".array_record"):
            reader = ArrayRecordReader(os.path.join(directory, name))
            out += [json.loads(r) for r in reader.read_all()]
            reader.close()
    return out


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    root = tmp_path_factory.mktemp("curation")
    repos = make_corpus(root)
    report = run(settings_from_config(config(input=str(repos), output=str(root / "out"))))
    return root / "out", report


def test_curation_output_report_and_drops(curated):
    out, report = curated
    assert sorted(os.listdir(out)) == ["documents", "histograms.png", "pairs", "report.json", "report.md"]
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert stages["read"]["dropped"] == {"binary": 1, "symlink_outside": 1, "too_large": 1, "undecodable": 1}
    assert stages["read"]["docs_in"] == stages["read"]["docs_out"] + 4
    assert stages["metrics"]["dropped"] == {"syntax_error": 1}
    assert stages["exact_dedup"]["dropped"] == {"exact_duplicate": 1}
    assert stages["exact_dedup"]["cluster_sizes"]["2"] == 1
    docs = records(out / "documents")
    by_id = {d["id"]: d for d in docs}
    assert sorted(by_id) == ["clib", "gosvc", "stdlib", "webapp"]  # the fork kept nothing
    assert by_id["gosvc"]["paths"] == ["util/hello.go", "main.go"]
    assert by_id["webapp"]["paths"] == ["README.md", "math.js", "app.js"]
    assert by_id["clib"]["paths"] == ["list.h", "list.c"]
    paths = by_id["stdlib"]["paths"]
    assert paths.index("textwrap.py") < paths.index("uses.py") and paths.index("heapq.py") < paths.index("uses.py")
    assert by_id["stdlib"]["text"].startswith("<repo_name>stdlib\n<file_sep>")
    assert stages["write"]["docs_out"] == 4 and stages["write"]["languages"]["python"] == 1
    pairs = records(out / "pairs")
    comments = {p["comment"] for p in pairs}
    assert "Wrap the text to forty columns and return the lines." in comments
    assert "Hello greets the person by name on standard output." in comments
    assert all(p["kind"] == "pair" for p in pairs) and len({p["id"] for p in pairs}) == len(pairs)
    assert sum(report["histograms"]["comment_ratio"]["counts"]) == stages["metrics"]["docs_out"]
    assert all(stages[name]["busy_seconds"] > 0 for name in ("read", "rules", "metrics", "near_dedup", "repository"))
    md = (out / "report.md").read_text()
    assert "| read |" in md and "syntax_error 1" in md


@pytest.mark.slow  # 27 s: a train.py run on the curated output
def test_train_py_trains_two_steps_on_the_curated_output(curated, tmp_path):
    import train
    from configs import default

    out, _ = curated
    c = default.get_config()
    c.model_overrides.update(dict(num_hidden_layers=2, max_position_embeddings=64))
    c.batch_size, c.seq_len, c.steps = 2, 32, 2
    c.log_every, c.checkpoint_every, c.eval_every = 1, 2, 0
    c.peak_flops_per_device = 1e11
    c.tokenizer_vocab_size = 512
    c.data.kind, c.data.record_format, c.data.path = "array_record", "json", str(out / "documents")
    c.data.eval_fraction = 0.0
    train.run(c, str(tmp_path / "work"))
    rows = [json.loads(line) for line in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def test_stack_jsonl_parquet_and_text_inputs(tmp_path):
    rows = [{"repo_name": "o/a", "path": "m.py", "content": "def f(x):\n    return x * 2\n", "stars": 3},
            {"repo_name": "o/b", "path": "m.py", "content": "def f(x):\n    return x * 2\n", "stars": 9},
            {"repo_name": "o/c", "path": "n.py", "content": "print('hello there')\n"},
            {"path": "no_repo.py", "content": "x = 1\n"}]
    (tmp_path / "stack.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "stack.parquet")
    overrides = {"repository.enabled": False, "dedup.near": False, "pairs.enabled": False, "num_shards": 1}
    for name in ("stack.jsonl", "stack.parquet"):
        out = tmp_path / f"out-{name}"
        report = run(settings_from_config(config(input=str(tmp_path / name), output=str(out), input_kind="stack",
                                                 **overrides)))
        assert sorted(r["id"] for r in records(out / "documents")) == ["o/b/m.py", "o/c/n.py"]  # most stars wins
        assert report["stages"]["read"]["dropped"] == ({"malformed": 1} if name.endswith("jsonl") else {})
    texts = ["How do I reverse a list in Python? Use slicing with a step of minus one.",
             "See ![diagram](d.png) for the layout of the modules in the package.",
             "Visit https://example.com for the answer to this question today.",
             "Hello {{ name }}, the function returns the sum of its two arguments.",
             "How do I reverse a list in Python? Use slicing with a step of minus one."]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "out-text"
    report = run(settings_from_config(config(input=str(tmp_path / "t.jsonl"), output=str(out), input_kind="text",
                                             num_shards=1)))
    assert [r["text"] for r in records(out / "documents")] == [texts[0]]
    assert report["stages"]["rules"]["dropped"] == {"image_reference": 1, "link": 1, "placeholder": 1}
    assert report["stages"]["exact_dedup"]["dropped"] == {"exact_duplicate": 1}


@pytest.mark.parametrize("fields,error,match", [
    ({"input": ""}, CurationConfigError, "input is empty"),
    ({"input": "/nonexistent/dir"}, CurationConfigError, "input='/nonexistent/dir' is not a directory"),
    ({"languages": "python,klingon"}, CurationConfigError, "languages: unknown language 'klingon'"),
    ({"code_rules.min_alnum_fraction": 1.5}, CurationConfigError, r"code_rules.min_alnum_fraction=1.5 is out of range"),
    ({"dedup.threshold": -0.1}, CurationConfigError, r"dedup.threshold=-0.1 is out of range"),
    ({"runner": "prism"}, CurationConfigError, "runner='prism'; expected one of"),
    ({"input_kind": "csv"}, CurationConfigError, "input_kind='csv'"),
    ({"num_workers": 0}, CurationConfigError, "num_workers=0"),
])
def test_bad_configs_stop_before_any_work(tmp_path, fields, error, match):
    repos = tmp_path / "repos"
    (repos / "r").mkdir(parents=True)
    (repos / "r" / "a.py").write_text("x = 1\n")
    cfg = config(input=str(repos), output=str(tmp_path / "out"))
    cfg.update_from_flattened_dict(fields)
    with pytest.raises(error, match=match):
        settings_from_config(cfg)
    assert not (tmp_path / "out").exists()


def test_command_line_errors_exit_2_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists").mkdir()
    (tmp_path / "repos" / "r").mkdir(parents=True)
    cmd = [sys.executable, "-m", "ling_jax.curation", "--config", "configs/curate_code.py"]
    got = subprocess.run([*cmd, f"--config.input={tmp_path / 'empty'}", f"--config.output={tmp_path / 'o'}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert got.returncode == 2 and "error: input=" in got.stderr and "is empty" in got.stderr
    assert "Traceback" not in got.stderr
    with pytest.raises(OutputDirError, match=r"output=.* already exists: set --config\.overwrite=True"):
        settings_from_config(config(input=str(tmp_path / "repos"), output=str(tmp_path / "exists")))


def test_local_runner_is_pinned_and_prism_is_never_used(tmp_path, monkeypatch):
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions
    from apache_beam.runners.portability import prism_runner

    def refuse(*args, **kwargs):
        raise AssertionError("the Prism runner (which downloads a binary) must not run")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", refuse)
    (tmp_path / "repos" / "r").mkdir(parents=True)
    (tmp_path / "repos" / "r" / "a.py").write_text("def f(x):\n    return x + 1\n")
    settings = settings_from_config(config(input=str(tmp_path / "repos"), output=str(tmp_path / "out")))
    assert settings.beam_options().view_as(StandardOptions).runner == "FnApiRunner"
    multi = settings_from_config(config(input=str(tmp_path / "repos"), output=str(tmp_path / "o2"),
                                        running_mode="multi_processing", num_workers=2))
    assert multi.beam_options().view_as(DirectOptions).direct_num_workers == 2
    report = run(settings)
    assert report["stages"]["write"]["docs_out"] == 1


@pytest.mark.slow
def test_output_is_identical_on_one_and_two_workers(tmp_path):
    repos = make_corpus(tmp_path)
    outs = []
    for mode, workers in (("in_memory", 1), ("multi_processing", 2)):
        out = tmp_path / f"out-{mode}"
        run(settings_from_config(config(input=str(repos), output=str(out), running_mode=mode, num_workers=workers)))
        outs.append(out)
    for sub in ("documents", "pairs"):
        names = sorted(os.listdir(outs[0] / sub))
        assert names and names == sorted(os.listdir(outs[1] / sub))
        assert all((outs[0] / sub / n).read_bytes() == (outs[1] / sub / n).read_bytes() for n in names)


def test_records_lost_by_a_stage_stop_the_run():
    from ling_jax.curation.report import RecordsLostError, build, check_conservation

    good = {"rules": {"docs_in": 5, "docs_out": 3, "dropped_urls": 2}, "repository": {"docs_in": 3, "docs_out": 1}}
    check_conservation(build(good, {}, 1.0))
    bad = {"near_dedup": {"docs_in": 5, "docs_out": 3, "dropped_near_duplicate": 1}}
    with pytest.raises(RecordsLostError, match="stage near_dedup: 5 records in, 3 out and 1 dropped: 1 lost"):
        check_conservation(build(bad, {}, 1.0))
