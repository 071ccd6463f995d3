"""Exact and near-deduplication as Beam transforms (The Stack's method), independent of input order and runner.

Exact: records grouped by the SHA-256 of their text; the survivor of each group is the best-ranked record.
Near: MinHash signatures (`ling_jax.curation.minhash`), LSH band buckets formed by `GroupByKey`, candidate
pairs from each bucket verified by the signature estimate of their Jaccard similarity (>= threshold), then
the duplicate clusters (connected components of the verified pairs) resolved to one survivor each. Only the
pairs (one per duplicate) meet on one worker, for the union-find; texts and signatures stay distributed and
are joined back by id with `CoGroupByKey`.

Rank (who survives): most stars, then the lexicographically smallest `repo/path` id.
Cluster sizes are counted as `cluster_size_<n>` in the stage's Beam metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import apache_beam as beam
import numpy as np

from ling_jax.curation import minhash
from ling_jax.curation.records import Reason, Record, Stage, count, count_drop, count_in, count_out, timed
from ling_jax.curation.settings import bounded

Member = tuple[tuple[int, str], str]  # (rank, id) of a record in the near-dedup graph.
_ALL_PAIRS_UP_TO = 20  # Buckets up to this size give every pair as a candidate; larger: star + neighbours.


@dataclasses.dataclass(frozen=True)
class DedupSettings:
    """Deduplication (config section `dedup`)."""

    exact: bool = bounded(True)  # Drop exact duplicates (same SHA-256 of the text).
    near: bool = bounded(True)  # Drop near-duplicates (MinHash LSH).
    num_perm: int = bounded(256, 16, 4096)  # MinHash permutations.
    ngram: int = bounded(5, 1, 100)  # Word n-gram shingles.
    threshold: float = bounded(0.85, 0.0, 1.0)  # Jaccard similarity at which documents are duplicates.
    bands: int = bounded(0, 0)  # LSH bands (0: tuned for `threshold`, see minhash.lsh_params).
    rows: int = bounded(0, 0)  # LSH rows per band (0: tuned); bands * rows <= num_perm.
    false_positive_weight: float = bounded(0.1, 0.0, 1.0)  # Tuning weights: candidates are verified, so
    false_negative_weight: float = bounded(0.9, 0.0, 1.0)  # misses cost more than false candidates.

    def lsh(self) -> tuple[int, int]:
        """(bands, rows)."""
        if self.bands and self.rows:
            return self.bands, self.rows
        return minhash.lsh_params(self.threshold, self.num_perm, self.false_positive_weight,
                                  self.false_negative_weight)


def rank(rec: Record) -> tuple[int, str]:
    """Sort key of survivorship: most stars first, then the smallest id."""
    return -int(rec.get("stars") or 0), rec["id"]


def keep_best(stage: Stage, reason: Reason, group: list[Record]):
    """The best-ranked record of a group of duplicates; the others are counted as dropped for `reason`."""
    group = sorted(group, key=rank)
    count(stage, f"cluster_size_{len(group)}")
    for rec in group[1:]:
        count_drop(stage, reason, rec)
    count_out(stage, group[0])
    yield group[0]


class ExactDedup(beam.PTransform):
    """Keeps one record per distinct text (the best-ranked)."""

    def expand(self, records):
        def key(rec: Record):
            count_in(Stage.EXACT_DEDUP, rec)
            yield hashlib.sha256(rec["text"].encode("utf-8")).hexdigest(), rec

        return (records | "HashText" >> beam.FlatMap(timed(Stage.EXACT_DEDUP, key)) | "GroupByHash" >> beam.GroupByKey()
                | "KeepBest" >> beam.FlatMap(timed(Stage.EXACT_DEDUP, lambda kv: keep_best(
                    Stage.EXACT_DEDUP, Reason.EXACT_DUPLICATE, list(kv[1])))))


def _candidates(bucket: list[Member]):
    """Candidate pairs of one LSH bucket of `(rank, id)` members, each pair `((rank, id), (rank, id))`."""
    members = sorted(set(bucket))
    if len(members) <= _ALL_PAIRS_UP_TO:
        yield from itertools.combinations(members, 2)
    else:
        yield from ((members[0], m) for m in members[1:])
        yield from itertools.pairwise(members[1:])


class _UnionFind(beam.CombineFn):
    """Union-find over verified pairs: the output is the clusters, each a rank-sorted list of members."""

    def create_accumulator(self):
        return []

    def add_input(self, acc, pair):
        acc.append(pair)
        return acc

    def merge_accumulators(self, accs):
        return [p for a in accs for p in a]

    def extract_output(self, acc):
        parent: dict[Member, Member] = {}

        def find(x: Member) -> Member:
            while parent.setdefault(x, x) != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for a, b in sorted(acc):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        clusters: dict[Member, list[Member]] = {}
        for x in sorted(parent):
            clusters.setdefault(find(x), []).append(x)
        return sorted(clusters.values())  # Members sorted by rank: the first survives.


class NearDedup(beam.PTransform):
    """Keeps one record per near-duplicate cluster (the best-ranked)."""

    def __init__(self, settings: DedupSettings):
        super().__init__()
        self.settings = settings

    def expand(self, records):
        s = self.settings
        bands, rows = s.lsh()

        def sign(rec: Record):
            count_in(Stage.NEAR_DEDUP, rec)
            sig = minhash.signature(rec["text"], s.num_perm, s.ngram)
            yield rec["id"], (rank(rec), sig.tobytes())

        signed = records | "Sign" >> beam.FlatMap(timed(Stage.NEAR_DEDUP, sign))
        by_id = records | "KeyById" >> beam.Map(lambda r: (r["id"], r))
        sigs = signed | "SigById" >> beam.Map(lambda kv: (kv[0], kv[1][1]))
        pairs = (signed
                 | "Bands" >> beam.FlatMap(lambda kv: [(k, (kv[1][0], kv[0])) for k in minhash.band_keys(
                     np.frombuffer(kv[1][1], np.uint32), bands, rows)])
                 | "GroupByBand" >> beam.GroupByKey()
                 | "Candidates" >> beam.FlatMap(lambda kv: _candidates(list(kv[1])))
                 | "DistinctPairs" >> beam.Distinct())
        first = ({"sig": sigs, "pair": pairs | "ByFirst" >> beam.Map(lambda p: (p[0][1], p))}
                 | "JoinFirst" >> beam.CoGroupByKey()
                 | "WithFirst" >> beam.FlatMap(_with_signature))
        edges = ({"sig": sigs, "pair": first}
                 | "JoinSecond" >> beam.CoGroupByKey()
                 | "Verify" >> beam.FlatMap(timed(Stage.NEAR_DEDUP, _verified), s.threshold))
        marks = (edges | "Clusters" >> beam.CombineGlobally(_UnionFind())
                 | "Duplicates" >> beam.FlatMap(_duplicates))
        return ({"rec": by_id, "dup": marks} | "JoinClusters" >> beam.CoGroupByKey()
                | "Resolve" >> beam.FlatMap(timed(Stage.NEAR_DEDUP, _resolve_marked)))


def _with_signature(kv):
    """`(second id, (pair, signature of the first))` for the pairs joined to their first member."""
    _, joined = kv
    sig = joined["sig"][0]
    for pair in joined["pair"]:
        yield pair[1][1], (pair, sig)


def _verified(kv, threshold: float):
    """The pairs joined to their second member whose signatures agree on at least `threshold`."""
    _, joined = kv
    sig_b = np.frombuffer(joined["sig"][0], np.uint32)
    for pair, sig_a in joined["pair"]:
        if minhash.jaccard_estimate(np.frombuffer(sig_a, np.uint32), sig_b) >= threshold:
            yield pair


def _duplicates(clusters: list[list[Member]]):
    """`(id, survivor id)` of every cluster member but its best-ranked one; counts the cluster sizes."""
    for members in clusters:
        count(Stage.NEAR_DEDUP, f"cluster_size_{len(members)}")
        for m in members[1:]:
            yield m[1], members[0][1]


def _resolve_marked(kv):
    """The record of an id, unless it is a duplicate of a better-ranked member of its cluster."""
    _, joined = kv
    for rec in joined["rec"]:
        if joined["dup"]:
            count_drop(Stage.NEAR_DEDUP, Reason.NEAR_DUPLICATE, rec)
        else:
            count_out(Stage.NEAR_DEDUP, rec)
            yield rec


__all__ = ["DedupSettings", "ExactDedup", "NearDedup", "keep_best", "rank"]
