"""Stages of a pre-training run (`config.stages`; the paper's Table 1) and the mixture pipeline that feeds them.

`config.stages` is a list of dicts, each with `name`, its length as `steps` or `tokens` (rounded to whole steps of
`batch_size * seq_len` tokens), optionally `mixture` (`{path: weight}` over the nodes of `data.sources`; the
ones it leaves out keep their `data.sources` weight) and optionally `schedule` (the learning-rate phases of the
stage, `ling_jax.train.optim` phase dicts; the last may leave out `steps`, it then fills the stage). Stage `k`
covers the steps `[start_k, start_k + steps_k)` counted from 0 (the optimizer's count); after the last stage the
last mixture holds. Without `config.stages` a mixture is one stage over the whole run.

Pipeline (`make_staged_iterator`), per process:

    per source: its documents -> tokenize / FIM -> drop and count (`ling_jax.data.pipeline`) -> pieces of at
    most seq_len tokens (`SplitStage`)  ==>  the stage's mixture by tokens (`MixIterator`) -> pack -> batch

At a stage boundary the next stage's mixture and packer start over the same per-source iterators (each source
continues where it was); the rows the previous packer had begun are dropped. The state (`get_state`, JSON) is
the batch count, the stage and the whole pipeline of that stage: every source's position and the mixer's
tokens and weights. `stats()` adds `share/<path>` (realized token share within the parent, since the stage
started), `target/<path>` and `stage` (its index) to the counts.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import ml_collections

from ling_jax.config import ConfigError
from ling_jax.data import pipeline
from ling_jax.data.counting import CountedIterator, DataError
from ling_jax.data.mixture import MixIterator, SourceNode, parse_sources
from ling_jax.data.packing import SplitStage
from ling_jax.data.settings import Exhausted, option
from ling_jax.data.tokenizer import Tokenizer

__all__ = ["MixtureIterator", "Stage", "StagedBatches", "make_mixture_eval_batches", "make_staged_iterator",
           "plan_stages"]

_STAGE_KEYS = frozenset({"name", "steps", "tokens", "mixture", "schedule"})


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: steps `[start, start + steps)` (counted from 0) train on `mixture` with the `phases`."""

    name: str
    start: int
    steps: int
    mixture: SourceNode | None  # None: the run has one source (no data.sources)
    phases: tuple[dict[str, Any], ...] = ()  # its learning-rate phases, steps filled in; (): config.schedule

    @property
    def end(self) -> int:
        return self.start + self.steps


def _stage_steps(spec: Mapping[str, Any], tokens_per_step: int, where: str) -> int:
    if ("steps" in spec) == ("tokens" in spec):
        raise ConfigError(f"{where}: give the stage's length as exactly one of steps or tokens")
    value = spec.get("steps", spec.get("tokens"))
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
        raise ConfigError(f"{where}.{'steps' if 'steps' in spec else 'tokens'}={value!r}: must be a number >= 1")
    steps = int(value) if "steps" in spec else round(value / tokens_per_step)
    if steps < 1 or ("steps" in spec and steps != value):
        raise ConfigError(f"{where}: {value!r} is not a whole number of steps >= 1 (a step is {tokens_per_step} "
                          "tokens); lengthen the stage")
    return steps


def _stage_phases(schedule: Any, steps: int, where: str) -> tuple[dict[str, Any], ...]:
    """The stage's phases with `steps` filled in (the last one's, when left out, fills the stage)."""
    phases = [dict(schedule)] if isinstance(schedule, Mapping) else [dict(p) for p in schedule or []]
    if not phases:
        return ()
    *head, last = phases
    if any("steps" not in p for p in head):
        raise ConfigError(f"{where}.schedule: only the last phase of a stage may leave out steps")
    used = sum(int(p["steps"]) for p in head)
    last.setdefault("steps", steps - used)
    if used + int(last["steps"]) != steps or int(last["steps"]) < 1:
        raise ConfigError(f"{where}.schedule: its phases last {used + int(last['steps'])} steps, the stage {steps}; "
                          "make them add up (or leave out the last phase's steps)")
    return tuple(phases)


def plan_stages(stages: Sequence[Mapping[str, Any]], root: SourceNode | None, *, tokens_per_step: int,
                total_steps: int) -> tuple[Stage, ...]:
    """The stages of `config.stages` over the mixture `root` (one stage over `total_steps` when there are none).

    Raises:
      ConfigError: A malformed stage; the message names it (`config.stages[1]`), the field and the fix.
    """
    if not stages:
        return (Stage("all", 0, max(int(total_steps), 1), root),)
    out, start, names = [], 0, set()
    for i, spec in enumerate(stages):
        where = f"config.stages[{i}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where}={spec!r}: a stage is a dict with name, steps or tokens, mixture, schedule")
        unknown = sorted(set(spec) - _STAGE_KEYS)
        if unknown:
            raise ConfigError(f"{where} has unknown keys {unknown}; a stage has {sorted(_STAGE_KEYS)}")
        name = spec.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise ConfigError(f"{where}.name={name!r}: give every stage a name of its own")
        names.add(name)
        steps = _stage_steps(spec, tokens_per_step, where)
        mixture = root
        if spec.get("mixture"):
            if root is None:
                raise ConfigError(f"{where}.mixture needs data.sources (the sources it weighs); set them or drop it")
            mixture = root.reweighted(dict(spec["mixture"]), f"{where}.mixture")
        out.append(Stage(name, start, steps, mixture, _stage_phases(spec.get("schedule"), steps, where)))
        start += steps
    if len({bool(s.phases) for s in out}) > 1:
        raise ConfigError("config.stages: some stages have a schedule and some not; give every stage its "
                          "schedule, or none (then config.schedule applies)")
    return tuple(out)


class _Mixed(grain.IterDataset):
    """The mixture of already open per-source iterators, as a dataset the packer can wrap."""

    def __init__(self, sources: Mapping[str, grain.DatasetIterator], root: SourceNode, where: str):
        super().__init__([])
        self._sources, self._root, self._where = sources, root, where
        self.iterator: MixIterator | None = None

    def __iter__(self) -> MixIterator:
        self.iterator = MixIterator(self._sources, self._root, self._where)
        return self.iterator


class StagedBatches(grain.DatasetIterator):
    """Batches (with `counts`) of the mixture of the current stage; see the module docstring."""

    def __init__(self, sources: Mapping[str, grain.IterDataset], stages: Sequence[Stage],
                 pack: Callable[[grain.IterDataset], grain.IterDataset]):
        iterators = {path: iter(ds) for path, ds in sources.items()}
        super().__init__(list(iterators.values()))
        self._iterators, self._stages, self._pack = iterators, tuple(stages), pack
        self._batch = 0
        self._open(0)

    def _open(self, k: int) -> None:
        self._stage = k
        stage = self._stages[k]
        self._mixed = _Mixed(self._iterators, stage.mixture, f"stage {stage.name!r}")
        self._pipeline = iter(self._pack(self._mixed))

    def _stage_of(self, batch: int) -> int:
        return max(k for k, s in enumerate(self._stages) if s.start <= batch)

    @property
    def stage(self) -> Stage:
        """The stage of the last batch (of the next one before any)."""
        return self._stages[self._stage]

    def mixer(self) -> MixIterator:
        """The current stage's mixer."""
        assert self._mixed.iterator is not None
        return self._mixed.iterator

    def __next__(self) -> dict[str, Any]:
        k = self._stage_of(self._batch)
        if k != self._stage:
            self._open(k)
        batch = next(self._pipeline)
        self._batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"batch": self._batch, "stage": self._stage, "name": self.stage.name,
                "pipeline": self._pipeline.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        k, name = int(state["stage"]), state["name"]
        if k >= len(self._stages) or self._stages[k].name != name:
            raise DataError(f"the checkpoint's data is in stage {k} {name!r}, which config.stages no longer has "
                            f"({[s.name for s in self._stages]}); restore the stage or start a new --workdir")
        self._batch = int(state["batch"])
        self._open(k)
        self._pipeline.set_state(state["pipeline"])
        if self.mixer().reweighted:
            old, new = self.mixer().reweighted
            changed = ", ".join(f"{p} {old.get(p)} -> {w}" for p, w in new.items() if old.get(p) != w)
            print(f"data: the weights of stage {name!r} changed since the checkpoint ({changed}); every source "
                  "continues where it was and the token shares count from here", flush=True)


class MixtureIterator(CountedIterator):
    """`CountedIterator` over `StagedBatches`; `stats()` adds the shares, targets and stage (module docstring)."""

    def stats(self) -> dict[str, Any]:
        staged: StagedBatches = self._parent
        shares, targets = staged.mixer().shares(), staged.stage.mixture.targets()
        return {**super().stats(), "stage": staged._stage, **{f"share/{p}": v for p, v in shares.items()},
                **{f"target/{p}": v for p, v in targets.items()}}


def make_staged_iterator(data_cfg: ml_collections.ConfigDict, stages: Sequence[Stage], *, tokenizer: Tokenizer | None,
                         seq_len: int, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1,
                         train: bool = True, workers: int | None = None) -> MixtureIterator:
    """The batches of the mixture `data.sources` through `stages` (module docstring); args as
    `ling_jax.data.pipeline.training_batches`. `train=False`: the held-out documents, every source cycling.

    Raises:
      ConfigError, DataError: As for one source, the message naming the source (`source 'code/raw' ...`).
    """
    root = parse_sources(data_cfg)
    if root is None:
        raise ConfigError("data.sources is empty; a mixture needs sources")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    split = functools.partial(SplitStage, max_len=seq_len, features=("inputs",))
    workers = int(option(data_cfg, "worker_count")) if workers is None else workers
    sources, described = {}, []
    for leaf in root.leaves():
        epochs = 1 if train and leaf.on_exhausted is Exhausted.STOP else None
        try:
            ds, source = pipeline.pretraining_documents(
                leaf.data, tokenizer=tokenizer, seq_len=seq_len, seed=seed, train=train,
                shard=(process_index, process_count), num_epochs=epochs, workers=workers, then=split)
        except (ConfigError, DataError) as e:
            raise type(e)(f"source {leaf.path!r} of data.sources: {e}") from None
        sources[leaf.path] = ds
        described.append(f"{leaf.path}: {len(source)} documents")
    pack = pipeline.row_packer(data_cfg, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                               train=train)
    return MixtureIterator(StagedBatches(sources, stages, pack), dataset="mixture (" + ", ".join(described) + ")")


def make_mixture_eval_batches(data_cfg: ml_collections.ConfigDict, stages: Sequence[Stage], *,
                              tokenizer: Tokenizer | None, seq_len: int, batch_size: int, num_batches: int, seed: int,
                              ) -> list[dict[str, Any]]:
    """Held-out batches of the first stage's mixture (fixed for the run, so eval losses compare across stages)."""
    it = make_staged_iterator(data_cfg, stages[:1], tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                              seed=seed, train=False, workers=0)
    batches = list(itertools.islice(it, num_batches))
    it.close()
    return batches
