"""The curation report: `report.json`, `report.md` and `histograms.png`, from the pipeline's Beam metrics.

Every stage counts, in its metric namespace, `docs_in`, `bytes_in`, `docs_out`, `bytes_out`, `dropped_<reason>`
(and its bytes), `cluster_size_<n>`, `lang_<language>` and `hist_<name>_<bin>` (see `Histogram`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Any

from ling_jax.curation.records import Stage, count

_HIST = re.compile(r"hist_(\w+)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Histogram:
    """Fixed bins over [lo, hi] of one record measure, counted as Beam metrics."""

    name: str
    lo: float
    hi: float
    bins: int = 20

    def add(self, stage: Stage, value: float) -> None:
        """Counts `value` into its bin (values outside [lo, hi] go to the edge bins)."""
        i = int((value - self.lo) / (self.hi - self.lo) * self.bins)
        count(stage, f"hist_{self.name}_{min(max(i, 0), self.bins - 1)}")

    def edges(self) -> list[float]:
        """The bin edges."""
        return [self.lo + (self.hi - self.lo) * i / self.bins for i in range(self.bins + 1)]


HISTOGRAMS = {h.name: h for h in (Histogram("comment_ratio", 0.0, 1.0), Histogram("mean_line_length", 0.0, 100.0),
                                  Histogram("quality_score", 0.0, 1.0))}


def counters(result: Any) -> dict[str, dict[str, int]]:
    """`stage -> counter -> value` of a finished pipeline result."""
    out: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for c in result.metrics().query()["counters"]:
        value = c.committed if c.committed is not None else c.attempted
        out[c.key.metric.namespace][c.key.metric.name] = out[c.key.metric.namespace].get(c.key.metric.name, 0) + value
    return out


def build(stage_counters: dict[str, dict[str, int]], config: dict, seconds: float) -> dict:
    """The report as a JSON-ready dict."""
    stages, histograms = {}, {}
    for stage in Stage:
        c = stage_counters.get(stage.value, {})
        if not c:
            continue
        stages[stage.value] = {
            "docs_in": c.get("docs_in", 0), "bytes_in": c.get("bytes_in", 0),
            "docs_out": c.get("docs_out", 0), "bytes_out": c.get("bytes_out", 0),
            "dropped": {k[8:]: v for k, v in sorted(c.items()) if k.startswith("dropped_") and
                        not k.startswith("dropped_bytes_")},
            "dropped_bytes": {k[14:]: v for k, v in sorted(c.items()) if k.startswith("dropped_bytes_")},
            "cluster_sizes": {k[13:]: v for k, v in sorted(c.items(), key=lambda kv: (len(kv[0]), kv[0]))
                              if k.startswith("cluster_size_")},  # size (a string, as in JSON) -> clusters
            "languages": {k[5:]: v for k, v in sorted(c.items()) if k.startswith("lang_")},
            "busy_seconds": round(c.get("busy_us", 0) / 1e6, 3),  # summed over workers
            "mb_per_busy_second": round(c.get("bytes_in", 0) / 1e6 / (c["busy_us"] / 1e6), 3) if c.get("busy_us")
            else None,
            "other": {k: v for k, v in sorted(c.items()) if not k.startswith(
                ("docs_", "bytes_", "dropped_", "cluster_size_", "lang_", "hist_", "busy_us"))},
        }
        for k, v in c.items():
            m = _HIST.match(k)
            if m and m.group(1) in HISTOGRAMS:
                counts = histograms.setdefault(m.group(1), [0] * HISTOGRAMS[m.group(1)].bins)
                counts[int(m.group(2))] += v
    hist = {name: {"edges": HISTOGRAMS[name].edges(), "counts": counts} for name, counts in sorted(histograms.items())}
    return {"config": config, "seconds": round(seconds, 3), "stages": stages, "histograms": hist}


class RecordsLostError(RuntimeError):
    """A stage's counters do not add up: records vanished without being counted (a runner or worker fault)."""


def check_conservation(report: dict) -> None:
    """Checks that every one-to-one stage emitted or dropped each record it received.

    Raises:
      RecordsLostError: docs_in != docs_out + drops in a stage (the repository stage, which merges files into
        documents, is not checked).
    """
    for name, s in report["stages"].items():
        if name == Stage.REPOSITORY.value:
            continue
        dropped = sum(s["dropped"].values())
        if s["docs_in"] != s["docs_out"] + dropped:
            raise RecordsLostError(f"stage {name}: {s['docs_in']} records in, {s['docs_out']} out and {dropped} "
                                   f"dropped: {s['docs_in'] - s['docs_out'] - dropped} lost; the output is not "
                                   "published")


def markdown(report: dict) -> str:
    """A short human summary of `report`."""
    lines = ["# Curation report", "", f"Wall time: {report['seconds']:.1f} s.", "",
             "| stage | docs in | docs out | MB in | MB out | busy s | MB/busy s | drops |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, s in report["stages"].items():
        drops = ", ".join(f"{k} {v}" for k, v in s["dropped"].items()) or "-"
        rate = f"{s['mb_per_busy_second']:.2f}" if s["mb_per_busy_second"] else "-"
        lines.append(f"| {name} | {s['docs_in']} | {s['docs_out']} | {s['bytes_in'] / 1e6:.2f} | "
                     f"{s['bytes_out'] / 1e6:.2f} | {s['busy_seconds']:.2f} | {rate} | {drops} |")
    for name, s in report["stages"].items():
        if s["languages"]:
            lines += ["", f"Languages ({name}): " + ", ".join(f"{k} {v}" for k, v in
                                                             sorted(s["languages"].items(), key=lambda kv: -kv[1]))]
        if s["cluster_sizes"]:
            lines += ["", f"Duplicate cluster sizes ({name}): " + ", ".join(
                f"{k}: {v}" for k, v in s["cluster_sizes"].items())]
    lines += ["", "Histograms: histograms.png.", ""]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """The histograms of `report` as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = report["histograms"]
    fig, axes = plt.subplots(1, max(len(hist), 1), figsize=(5 * max(len(hist), 1), 3.5), squeeze=False)
    for ax, (name, h) in zip(axes[0], sorted(hist.items()), strict=False):
        edges = h["edges"]
        ax.bar(edges[:-1], h["counts"], width=edges[1] - edges[0], align="edge")
        ax.set_title(name.replace("_", " "))
        ax.set_ylabel("documents")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(report: dict, directory: str) -> None:
    """Writes report.json, report.md and histograms.png into `directory`."""
    with open(os.path.join(directory, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1, sort_keys=True, default=str)
    with open(os.path.join(directory, "report.md"), "w") as fh:
        fh.write(markdown(report))
    plot(report, os.path.join(directory, "histograms.png"))
