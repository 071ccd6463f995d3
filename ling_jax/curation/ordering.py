"""Repository-level samples (paper section 2.2.2): files ordered by their import graph, one document each.

Per repository, the import statements of every file in a grammar language (`ling_jax.curation.imports`)
are resolved to files of the repository (`ling_jax.curation.resolve`); `dependency_order` is the paper's
lexicographic topological sort: repeatedly take the file of minimum in-degree (its number of not yet placed
dependencies), ties broken by path order; when that minimum is above zero the file breaks a cycle. So
dependencies come before the files that import them, and the order is unique for a graph.

The document format (`repository_text`), with the default separators:

    <repo_name>owner/name
    <file_sep>path/of/first.py
    ...its text...
    <file_sep>path/of/second.py
    ...

Repositories without a file in a grammar language cannot be ordered and fall back to one document per file,
counted `fallback_repositories` / `fallback_files`.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq

import apache_beam as beam

from ling_jax.curation.imports import extract
from ling_jax.curation.languages import GRAMMAR_LANGUAGES
from ling_jax.curation.records import DocKind, Record, Stage, count, count_in, count_out, record, timed
from ling_jax.curation.resolve import dependency_graph
from ling_jax.curation.settings import bounded


@dataclasses.dataclass(frozen=True)
class OrderingSettings:
    """Repository-level documents (config section `repository`)."""

    enabled: bool = bounded(True)  # One document per repository (False: one per file).
    repo_token: str = bounded("<repo_name>")  # Starts a repository document, followed by its name.
    file_token: str = bounded("<file_sep>")  # Starts each file, followed by its path and a newline.


def dependency_order(deps: dict[str, set[str]]) -> list[str]:
    """The files of `deps` (`path -> paths it imports`), dependencies first; cycles broken at min in-degree."""
    nodes = set(deps)
    dependents: dict[str, set[str]] = {n: set() for n in nodes}
    indegree = {}
    for n in nodes:
        mine = (deps[n] & nodes) - {n}
        indegree[n] = len(mine)
        for d in mine:
            dependents[d].add(n)
    heap = [(d, n) for n, d in indegree.items()]
    heapq.heapify(heap)
    placed: list[str] = []
    done: set[str] = set()
    while heap:
        d, n = heapq.heappop(heap)
        if n in done or d != indegree[n]:
            continue  # A stale entry: the file's in-degree dropped since.
        done.add(n)
        placed.append(n)
        for m in dependents[n]:
            if m not in done:
                indegree[m] -= 1
                heapq.heappush(heap, (indegree[m], m))
    return placed


def repository_text(repo: str, files: list[Record], settings: OrderingSettings) -> str:
    """The repository document of `files` (already in order)."""
    parts = [f"{settings.repo_token}{repo}\n"]
    for f in files:
        text = f["text"] if f["text"].endswith("\n") else f["text"] + "\n"
        parts.append(f"{settings.file_token}{f['path']}\n{text}")
    return "".join(parts)


def _summary(files: list[Record]) -> dict:
    sizes = collections.Counter()
    for f in files:
        sizes[f["language"]] += len(f["text"])
    eloc = sum(f["metrics"].get("eloc", 0) for f in files)
    scores = [f["score"] for f in files if f["score"] is not None]
    return {"language": max(sorted(sizes), key=lambda k: sizes[k]), "languages": sorted(sizes),
            "metrics": {"files": len(files), "eloc": eloc},
            "score": sum(scores) / len(scores) if scores else None,
            "stars": max(f.get("stars") or 0 for f in files), "license": files[0].get("license")}


def order_repository(item: tuple[str, list[Record]], settings: OrderingSettings):
    """The repository document of one repository's files, or its files when it cannot be ordered."""
    repo, files = item
    files = sorted(files, key=lambda f: f["path"])
    for f in files:
        count_in(Stage.REPOSITORY, f)
    analysable = {f["path"]: (f["language"], extract(f["language"], f["text"]))
                  for f in files if f["language"] in GRAMMAR_LANGUAGES}
    if not analysable:
        count(Stage.REPOSITORY, "fallback_repositories")
        for f in files:
            count(Stage.REPOSITORY, "fallback_files")
            count_out(Stage.REPOSITORY, f)
            yield f
        return
    deps = dependency_graph(analysable)
    deps.update({f["path"]: set() for f in files if f["path"] not in deps})
    count(Stage.REPOSITORY, "import_edges", sum(len(d - {p}) for p, d in deps.items()))
    by_path = {f["path"]: f for f in files}
    ordered = [by_path[p] for p in dependency_order(deps)]
    doc = record(repo, "", repository_text(repo, ordered, settings), DocKind.REPOSITORY, **_summary(ordered))
    doc["id"] = repo
    doc["paths"] = [f["path"] for f in ordered]
    count(Stage.REPOSITORY, "repositories")
    count_out(Stage.REPOSITORY, doc)
    yield doc


class RepositoryDocuments(beam.PTransform):
    """File records -> one record per repository, its files in dependency order."""

    def __init__(self, settings: OrderingSettings):
        super().__init__()
        self.settings = settings

    def expand(self, records):
        settings = self.settings
        return (records | "KeyByRepo" >> beam.Map(lambda r: (r["repo"], r))
                | "GroupByRepo" >> beam.GroupByKey()
                | "Order" >> beam.FlatMap(timed(Stage.REPOSITORY, lambda kv: order_repository(
                    (kv[0], list(kv[1])), settings))))
