"""Benchmark of the curation pipeline on real code: documents/s and MB/s per stage and end to end, peak RSS.

    python benchmarks/bench_curate.py [--source SITE_PACKAGES] [--workers 2] [--min_mb 200] [--workdir /tmp]

The corpus is the installed packages of this virtual environment (code nobody here wrote): every top-level
package folder of site-packages becomes one repository (a symlink in a staging folder). A fastText quality
classifier is trained on 2,000 of its .py files, labelled by their comment ratio against the median (a
stand-in label, only to time the scoring stage). Then `python -m ling_jax.curation` runs as a child process on Beam's
local FnApiRunner with `--workers` worker processes; peak RSS is sampled over the child and all its worker
processes (psutil). Per stage, `busy s` is the time spent in the stage's own functions summed over workers
(Beam metrics `busy_us`), and MB/s its input bytes per busy second; end to end is input MB per wall second.
Fails unless the corpus read is at least `--min_mb` MB.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time

import psutil

REPO = pathlib.Path(__file__).resolve().parents[1]


def stage_corpus(source: pathlib.Path, dest: pathlib.Path) -> int:
    """Symlinks every package folder of `source` into `dest`; returns how many."""
    dest.mkdir(parents=True)
    n = 0
    for entry in sorted(source.iterdir()):
        if entry.is_dir() and not entry.name.endswith((".dist-info", ".egg-info", ".data")) and \
                not entry.name.startswith(("_", ".")):
            os.symlink(entry.resolve(), dest / entry.name)
            n += 1
    return n


def quality_data(corpus: pathlib.Path, out: pathlib.Path, n: int = 2000) -> None:
    """Labelled jsonl of .py files: `high` when the comment ratio is at least the median, else `low`."""
    sys.path.insert(0, str(REPO))
    from ling_jax.curation.analysis import analyse

    files = sorted(p for p in corpus.glob("*/**/*.py") if p.is_file() and 0 < p.stat().st_size < 100_000)
    random.Random(0).shuffle(files)
    texts = [f.read_text(errors="replace") for f in files[:n]]
    ratios = [analyse("python", t).comment_ratio for t in texts]
    median = sorted(ratios)[len(ratios) // 2]
    with open(out, "w") as fh:
        for text, ratio in zip(texts, ratios, strict=True):
            fh.write(json.dumps({"text": text[:5000], "label": "high" if ratio >= median else "low"}) + "\n")


def peak_rss(proc: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    """Samples the summed RSS of `proc` and its descendants until `stop`."""
    while not stop.is_set():
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=sysconfig.get_paths()["purelib"], help="site-packages to curate")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--min_mb", type=float, default=200.0)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_curate-", dir=args.workdir))
    repos = stage_corpus(pathlib.Path(args.source), work / "repos")
    quality_data(work / "repos", work / "quality.jsonl")
    cmd = [sys.executable, "-m", "ling_jax.curation", "--config", "configs/curate_code.py",
           f"--config.input={work / 'repos'}", f"--config.output={work / 'out'}",
           f"--config.num_workers={args.workers}", "--config.running_mode=multi_processing",
           f"--config.quality.train_data={work / 'quality.jsonl'}", "--config.num_shards=8"]
    start = time.time()
    child = subprocess.Popen(cmd, cwd=REPO)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_rss, args=(psutil.Process(child.pid), stop, peak), daemon=True)
    sampler.start()
    rc = child.wait()
    stop.set()
    wall = time.time() - start
    if rc != 0:
        print(f"curation failed with exit code {rc}", file=sys.stderr)
        return rc
    report = json.loads((work / "out" / "report.json").read_text())
    stages = report["stages"]
    mb_in = stages["read"]["bytes_out"] / 1e6
    docs_in = stages["read"]["docs_out"]
    print(f"\ncorpus: {args.source} ({repos} repositories), {docs_in} text files, {mb_in:.1f} MB read; "
          f"{args.workers} workers; output {work / 'out'}\n")
    print("| stage | docs in | docs out | MB in | MB out | busy s | docs/busy s | MB/busy s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    sys.path.insert(0, str(REPO))
    from ling_jax.curation.records import Stage

    for name in [st.value for st in Stage if st.value in stages]:
        s = stages[name]
        busy = s["busy_seconds"]
        rate = (f"{s['docs_in'] / busy:.0f} | {s['bytes_in'] / 1e6 / busy:.2f}") if busy else "- | -"
        print(f"| {name} | {s['docs_in']} | {s['docs_out']} | {s['bytes_in'] / 1e6:.1f} | {s['bytes_out'] / 1e6:.1f} "
              f"| {busy:.1f} | {rate} |")
    print(f"| end to end (wall) | {docs_in} | {stages['write']['docs_out']} | {mb_in:.1f} | "
          f"{stages['write']['bytes_out'] / 1e6:.1f} | {wall:.1f} | {docs_in / wall:.0f} | {mb_in / wall:.2f} |")
    print(f"\npeak RSS (driver + workers): {peak[0] / 2**20:.0f} MiB; wall {wall:.1f} s")
    print("drops:", json.dumps({k: v["dropped"] for k, v in stages.items() if v["dropped"]}))
    if mb_in < args.min_mb:
        print(f"error: the corpus read is {mb_in:.1f} MB, under --min_mb {args.min_mb}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
