"""Weighted, nested mixtures of document sources, mixed by tokens (`data.sources`; the paper's Table 1).

`data.sources` is a list of dicts. A source has a `name`, a `weight`, the data fields it sets (`kind`, `path`,
`text_field`, ...; `SOURCE_FIELDS`; the others come from the `data` section, so the tokenizer and the packing
are shared) and `on_exhausted` (`Exhausted`). A group has a `name`, a `weight` and `sources` (its children, which
inherit the data fields the group sets). The paper's two-level ratios are written as in its table:

    sources=[dict(name="code", weight=70, sources=[dict(name="raw", weight=94, path=...),
                                                   dict(name="related", weight=5, path=...),
                                                   dict(name="synthetic", weight=1, path=...)]),
             dict(name="text", weight=20, path=...), dict(name="math", weight=10, path=...)]

Nodes are named by their path (`code/raw`); a weight is relative to the node's siblings.

Mixing is by tokens: `MixIterator` is a deterministic weighted round-robin over the tokens emitted so far.
At each node it descends into the child furthest below its target share (`weight / sum of sibling weights`
times the tokens the node emitted, minus the child's tokens), until it reaches a source, whose next element it
emits. The realized share of every node therefore stays within one element of its target; sources are split
into pieces of at most `seq_len` tokens before mixing (`ling_jax.data.stages`), so that one long file cannot
swamp the shares. Its state (every source's position, the tokens per node, the weights) is JSON.
Grain's own `IterDataset.mix` mixes by element count (and stops at the first exhausted input), hence this.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import ml_collections

from ling_jax.config import ConfigError
from ling_jax.data.counting import DataError
from ling_jax.data.settings import Exhausted, SourceKind, option, parse_choice

__all__ = ["SOURCE_FIELDS", "MixIterator", "SourceNode", "needs_tokenizer", "parse_sources"]

# The data fields a source (or a group, for its children) may set; the rest are shared by the whole mixture.
SOURCE_FIELDS = frozenset({"kind", "path", "text_field", "record_format", "file_pattern", "exclude", "vocab_size",
                           "synthetic_num_docs", "synthetic_max_len", "synthetic_seed", "fim_rate", "fim_spm_rate",
                           "add_bos", "add_eos", "shuffle", "eval_fraction"})
_NODE_KEYS = frozenset({"name", "weight", "sources", "on_exhausted"})


@dataclasses.dataclass(frozen=True)
class SourceNode:
    """A node of the mixture: the root (path ""), a group (children) or a source (`data`, its data config)."""

    path: str
    weight: float
    children: tuple[SourceNode, ...] = ()
    data: ml_collections.ConfigDict | None = None
    on_exhausted: Exhausted = Exhausted.CYCLE

    def nodes(self) -> Iterator[SourceNode]:
        """This node and every node below it, depth first."""
        yield self
        for child in self.children:
            yield from child.nodes()

    def leaves(self) -> list[SourceNode]:
        """The sources below (or at) this node, in config order."""
        return [n for n in self.nodes() if not n.children]

    def weights(self) -> dict[str, float]:
        """`{path: weight}` of every node below the root."""
        return {n.path: n.weight for n in self.nodes() if n.path}

    def targets(self) -> dict[str, float]:
        """`{path: target share}` of every node below the root, within its parent (the table's ratios)."""
        out: dict[str, float] = {}
        for node in self.nodes():
            total = sum(c.weight for c in node.children)
            out.update({c.path: (c.weight / total if total else 0.0) for c in node.children})
        return out

    def reweighted(self, weights: Mapping[str, float], where: str) -> SourceNode:
        """This tree with the weights of the nodes `weights` names (`{path: weight}`), checked.

        Raises:
          ConfigError: A name that is no node (the message lists the names), or weights that leave nothing to mix.
        """
        known = self.weights()
        unknown = sorted(set(weights) - set(known))
        if unknown:
            raise ConfigError(f"{where} names {unknown}, which are not sources of data.sources; use some of "
                              f"{sorted(known)}")
        return _check(_reweight(self, {k: _weight(v, f"{where}[{k!r}]") for k, v in weights.items()}), where)


def _reweight(node: SourceNode, weights: Mapping[str, float]) -> SourceNode:
    children = tuple(_reweight(c, weights) for c in node.children)
    return dataclasses.replace(node, weight=weights.get(node.path, node.weight), children=children)


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}={value!r}: a weight must be a finite number >= 0; set it so")
    return float(value)


def _check(root: SourceNode, where: str) -> SourceNode:
    """`root`, after checking that every group with a weight > 0 has a child with a weight > 0."""
    for node in root.nodes():
        if node.children and (node.weight > 0 or not node.path) and not any(c.weight > 0 for c in node.children):
            name = f"group {node.path!r}" if node.path else "data.sources"
            raise ConfigError(f"{where}: every source of {name} has weight 0, so it has nothing to mix; give one "
                              "a weight > 0")
    return root


def _node(spec: Any, parent: str, data: ml_collections.ConfigDict, where: str) -> SourceNode:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}={spec!r}: a source is a dict with name, weight and its fields (or sources)")
    name = spec.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{where}.name={name!r}: give every source a non-empty name without '/'")
    path = f"{parent}/{name}" if parent else name
    where = f"data.sources[{path!r}]"
    unknown = sorted(set(spec) - _NODE_KEYS - SOURCE_FIELDS)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; a source may set {sorted(_NODE_KEYS | SOURCE_FIELDS)}"
                          " (the tokenizer, packing and workers are shared: set them in config.data)")
    weight = _weight(spec.get("weight", 1.0), f"{where}.weight")
    data = data.copy_and_resolve_references()
    data.update({k: v for k, v in spec.items() if k in SOURCE_FIELDS})
    if "sources" not in spec:
        exhausted = parse_choice(spec.get("on_exhausted", Exhausted.CYCLE.value), f"{where}.on_exhausted", Exhausted)
        option(data, "kind", SourceKind)  # a bad kind is named now
        return SourceNode(path, weight, data=data, on_exhausted=exhausted)
    if "on_exhausted" in spec:
        raise ConfigError(f"{where}.on_exhausted: a group has no data of its own; set on_exhausted on its sources")
    return SourceNode(path, weight, children=_children(spec["sources"], path, data, f"{where}.sources"))


def _children(specs: Any, parent: str, data: ml_collections.ConfigDict, where: str) -> tuple[SourceNode, ...]:
    if not isinstance(specs, list | tuple) or not specs:
        raise ConfigError(f"{where}={specs!r}: give a non-empty list of sources")
    children = tuple(_node(s, parent, data, f"{where}[{i}]") for i, s in enumerate(specs))
    names = [c.path for c in children]
    if len(set(names)) < len(names):
        raise ConfigError(f"{where}: the names {names} repeat; give every source a name of its own")
    return children


def parse_sources(data_cfg: ml_collections.ConfigDict) -> SourceNode | None:
    """The mixture `data.sources` describes (None when it is empty: the one source of `data`).

    Raises:
      ConfigError: A malformed source; the message names it (`data.sources['code/raw']`), the field and the fix.
    """
    specs = list(data_cfg.get("sources", None) or [])
    if not specs:
        return None
    base = ml_collections.ConfigDict({k: v for k, v in data_cfg.items() if k != "sources"})
    return _check(SourceNode("", 1.0, children=_children(specs, "", base, "data.sources")), "data.sources")


def needs_tokenizer(data_cfg: ml_collections.ConfigDict) -> bool:
    """Whether the data holds text (one source, or any source of the mixture, that is not synthetic)."""
    root = parse_sources(data_cfg)
    configs = [data_cfg] if root is None else [leaf.data for leaf in root.leaves()]
    return any(option(c, "kind", SourceKind) is not SourceKind.SYNTHETIC for c in configs)


class MixIterator(grain.DatasetIterator):
    """Mixes the elements (`inputs` and `counts`) of one iterator per source by tokens (module docstring).

    State: `{"sources": {path: state}, "tokens": {path: n}, "weights": {path: w}}`. Restoring a state saved
    with other weights keeps every source's position and restarts the token counts (`reweighted` then holds
    the old and the new weights), so that the new shares are met from there on.
    """

    def __init__(self, sources: Mapping[str, grain.DatasetIterator], root: SourceNode, where: str):
        """Mixes `sources` (`{path: iterator}` of every source of `root`); `where` names the stage for messages."""
        super().__init__()  # not their parent: closing a stage's pipeline must leave the sources open for the next
        self._sources, self._root, self._where = dict(sources), root, where
        self._exhausted = {leaf.path: leaf.on_exhausted for leaf in root.leaves()}
        self._tokens = {n.path: 0 for n in root.nodes()}
        self.reweighted: tuple[dict[str, float], dict[str, float]] | None = None

    def _pick(self) -> str:
        node = self._root
        while node.children:
            live = [c for c in node.children if c.weight > 0]
            total, emitted = sum(c.weight for c in live), self._tokens[node.path]
            node = max(live, key=lambda c: (c.weight / total * emitted - self._tokens[c.path], c.weight))
        return node.path

    def __next__(self) -> dict[str, Any]:
        path = self._pick()
        try:
            element = next(self._sources[path])
        except StopIteration:
            raise DataError(f"source {path!r} of data.sources ran out of documents in {self._where} (its "
                            "on_exhausted=stop); add data, lower its weight or set on_exhausted='cycle'") from None
        n = len(element["inputs"])
        parts = path.split("/")
        for prefix in ["", *("/".join(parts[: i + 1]) for i in range(len(parts)))]:
            self._tokens[prefix] += n
        return element

    def shares(self) -> dict[str, float]:
        """`{path: realized token share within its parent}` since this mixture started (or was reweighted)."""
        out = {}
        for node in self._root.nodes():
            emitted = self._tokens[node.path]
            out.update({c.path: (self._tokens[c.path] / emitted if emitted else 0.0) for c in node.children})
        return out

    def get_state(self) -> dict[str, Any]:
        return {"sources": {p: it.get_state() for p, it in self._sources.items()}, "tokens": dict(self._tokens),
                "weights": self._root.weights()}

    def set_state(self, state: dict[str, Any]) -> None:
        for path, it in self._sources.items():
            it.set_state(state["sources"][path])
        saved, now = {k: float(v) for k, v in state["weights"].items()}, self._root.weights()
        if saved == now:
            self._tokens = {k: int(v) for k, v in state["tokens"].items()}
        else:
            self._tokens = {n.path: 0 for n in self._root.nodes()}
            self.reweighted = (saved, now)
