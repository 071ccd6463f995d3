"""Validation of a whole `train.py` run config, in one place, before any compute.

`validate(cfg)` checks every field a run reads: its type and range, enum values (listing the
allowed ones), paths that must exist, and the combinations that can be known at start (batch
against accumulation and processes, a compile topology without `compile_only`, the schedule's
own consistency). It raises one `RunConfigError` listing every problem as
`config.<field>=<value>: <what is wrong>; <the fix>`, so a user fixes them all in one go.

What needs the model or the tokenizer (the end-of-run sample against the positions, the
tokenizer against the vocabulary) is checked by `train.py` as soon as those are built, still
before training.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from ling_jax import zoo
from ling_jax.config import AttentionImpl, ConfigError, DType, GmmImpl, Remat
from ling_jax.data.mixture import parse_sources
from ling_jax.data.settings import BadRecords, PackingKind, SourceKind, Truncation
from ling_jax.io.hub import is_hub_id
from ling_jax.train.optim import ScheduleKind, make_schedule
from ling_jax.train.tasks import Task, schedule_config, stage_plan

__all__ = ["RunConfigError", "evaluates", "problems", "validate"]


class RunConfigError(ConfigError):
    """One or more fields of a run config are invalid; the message lists each with its fix."""


@dataclasses.dataclass(frozen=True)
class Bound:
    """A numeric field's allowed range: `lo <= value` (`lo < value` when `open_lo`), `value < hi` likewise."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = True
    integer: bool = True
    optional: bool = False  # None is allowed (the field is off)

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"must be {'an integer' if self.integer else 'a number'}"
        if not math.isfinite(value):
            return "must be finite"
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            return f"must be {'>' if self.open_lo else '>='} {self.lo:g}"
        if self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi):
            return f"must be {'<' if self.open_hi else '<='} {self.hi:g}"
        return None


_COUNT, _POSITIVE = Bound(lo=0), Bound(lo=1)
_FRACTION = Bound(lo=0, hi=1, open_hi=False, integer=False)
_NONNEG = Bound(lo=0, integer=False)

# Numeric fields (dotted paths from the config root) and their ranges. A field a config lacks is skipped.
BOUNDS: dict[str, Bound] = {
    "steps": _POSITIVE, "batch_size": _POSITIVE, "seq_len": Bound(lo=2), "seed": _COUNT,
    "log_every": _POSITIVE, "checkpoint_every": _POSITIVE, "keep_checkpoints": _POSITIVE,
    "eval_every": _COUNT, "eval_batches": _POSITIVE, "sample_tokens": _COUNT, "sample_top_k": _COUNT,
    "sample_temperature": _NONNEG, "tokenizer_vocab_size": _COUNT, "tokenizer_max_documents": _POSITIVE,
    "peak_flops_per_device": _NONNEG,
    "loss.accumulation_steps": _POSITIVE, "loss.z_loss_weight": _NONNEG, "loss.balance_loss_weight": _NONNEG,
    "loss.bias_update_rate": _NONNEG,
    "optimizer.b1": Bound(lo=0, hi=1, integer=False), "optimizer.b2": Bound(lo=0, hi=1, integer=False),
    "optimizer.eps": Bound(lo=0, open_lo=True, integer=False), "optimizer.weight_decay": _NONNEG,
    "optimizer.clip_norm": Bound(lo=0, open_lo=True, integer=False, optional=True),
    "data.fim_rate": _FRACTION, "data.fim_spm_rate": _FRACTION, "data.eval_fraction": Bound(lo=0, hi=1, integer=False),
    "data.vocab_size": _POSITIVE, "data.synthetic_num_docs": _POSITIVE, "data.synthetic_max_len": _COUNT,
    "data.worker_count": _COUNT, "data.row_shuffle_window": _COUNT, "data.num_epochs": Bound(lo=1, optional=True),
    "eval.code_limit": Bound(lo=1, optional=True),
    "dpo.beta": Bound(lo=0, open_lo=True, integer=False), "dpo.label_smoothing": Bound(lo=0, hi=0.5, integer=False),
}

# Choice fields and their enums. An empty string or None means "unset" for the optional ones.
CHOICES: dict[str, tuple[type[enum.Enum], bool]] = {
    "task": (Task, False), "compute_dtype": (DType, False), "param_dtype": (DType, False),
    "attention_impl": (AttentionImpl, False), "gmm_impl": (GmmImpl, False), "remat": (Remat, False),
    "schedule.kind": (ScheduleKind, False), "optimizer.mu_dtype": (DType, True), "dpo.reference_dtype": (DType, True),
    "data.kind": (SourceKind, False), "data.packing": (PackingKind, False), "data.truncation": (Truncation, False),
    "data.bad_records": (BadRecords, False),
}

_MISSING = object()


def _get(cfg: ml_collections.ConfigDict, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(cfg: ml_collections.ConfigDict, path: str) -> bool:
    """Whether the field is there and not empty (a list such as `stages` or `data.sources`)."""
    return _get(cfg, path) not in (_MISSING, None, [], ())


def _show(path: str, value: Any) -> str:
    return f"config.{path}={value!r}"


def _bound_problems(cfg: ml_collections.ConfigDict) -> list[str]:
    out = []
    for path, bound in BOUNDS.items():
        value = _get(cfg, path)
        if value is not _MISSING and (why := bound.problem(value)):
            out.append(f"{_show(path, value)}: {why}; set --config.{path} to such a value")
    return out


def _choice_problems(cfg: ml_collections.ConfigDict) -> list[str]:
    out = []
    for path, (choices, optional) in CHOICES.items():
        value = _get(cfg, path)
        if value is _MISSING or (optional and value in ("", None)) or isinstance(value, choices):
            continue
        allowed = [m.value for m in choices]
        if value not in allowed:
            out.append(f"{_show(path, value)}: not a {choices.__name__}; use one of {', '.join(map(str, allowed))}")
    return out


def _exists(path: str) -> bool:
    expanded = os.path.expanduser(path)
    return bool(glob.glob(expanded, recursive=True)) if any(c in path for c in "*?[") else os.path.exists(expanded)


def _path_problems(cfg: ml_collections.ConfigDict) -> list[str]:
    out = []
    wanted = [("init_from", "a converted, Hugging Face or train.py checkpoint directory, or a Hub id")]
    if not _set(cfg, "data.sources") and _get(cfg, "data.kind") != SourceKind.SYNTHETIC.value:
        wanted += [("data.path", "the training data (file, directory or glob)")]
        if not _get(cfg, "data.path"):
            out.append(f"{_show('data.path', '')}: data.kind={_get(cfg, 'data.kind')!r} reads files; "
                       "set --config.data.path to the training data")
    wanted += [("data.tokenizer", "a tokenizer file or directory")]
    for path, what in wanted:
        value = _get(cfg, path)
        if isinstance(value, str) and value and not _exists(value) and not is_hub_id(value):  # Hub: when loaded
            out.append(f"{_show(path, value)}: no such file or directory; set --config.{path} to {what}")
    return out


def _combination_problems(cfg: ml_collections.ConfigDict, process_count: int) -> list[str]:
    out = []
    batch, accum = _get(cfg, "batch_size"), _get(cfg, "loss.accumulation_steps")
    if isinstance(batch, int) and isinstance(accum, int) and accum >= 1 and batch % accum:
        out.append(f"config.batch_size={batch} does not divide by config.loss.accumulation_steps={accum}; "
                   "make batch_size a multiple of it")
    if isinstance(batch, int) and batch >= 1 and batch % process_count:
        out.append(f"config.batch_size={batch} does not divide by the {process_count} processes of this job; "
                   "make batch_size a multiple of the process count")
    if _get(cfg, "compile_topology") and not _get(cfg, "compile_only"):
        out.append(f"{_show('compile_topology', cfg.compile_topology)} is only read with compile_only; "
                   "add --config.compile_only=true or drop compile_topology")
    if _get(cfg, "eval.code_tasks") and not _get(cfg, "eval_every"):
        out.append(f"{_show('eval.code_tasks', cfg.eval.code_tasks)} run at evaluation steps, but "
                   "config.eval_every=0; set --config.eval_every (or drop the code tasks)")
    if _get(cfg, "eval.code_tasks") and process_count > 1:
        out.append(f"{_show('eval.code_tasks', cfg.eval.code_tasks)}: code evaluation during training runs in "
                   "single-process jobs; drop it and evaluate the checkpoints with python -m ling_jax.evaluation")
    if not _get(cfg, "init_from") and _get(cfg, "model") not in zoo.list_models():
        out.append(f"{_show('model', _get(cfg, 'model'))}: not a zoo preset; use one of "
                   f"{', '.join(zoo.list_models())} or set config.init_from")
    return out


def _schedule_problems(cfg: ml_collections.ConfigDict) -> list[str]:
    if _get(cfg, "schedule") is _MISSING or _get(cfg, "schedule.kind") not in [k.value for k in ScheduleKind]:
        return []  # a bad kind is reported by the choices
    try:
        make_schedule(schedule_config(cfg) if _mixture_problems(cfg) == [] else cfg.schedule)
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        where = "config.stages[*].schedule" if _set(cfg, "stages") else "config.schedule"
        return [f"{where}: {e}; fix the schedule section"]
    return []


def _source_problems(cfg: ml_collections.ConfigDict) -> list[str]:
    """Each source of a mixture (`data.sources`) that is missing: its name, its path and the fix."""
    try:
        root = parse_sources(cfg.data) if _get(cfg, "data") is not _MISSING else None
    except ConfigError:
        return []  # reported by _mixture_problems
    out = []
    for leaf in root.leaves() if root is not None else []:
        kind, path = leaf.data.get("kind"), leaf.data.get("path", "")
        if kind != SourceKind.SYNTHETIC.value and not (isinstance(path, str) and path and _exists(path)):
            out.append(f"config.data.sources[{leaf.path!r}]: data.path={path!r} is no file or directory for this "
                       f"{kind} source; set the source's path to its data (or drop the source)")
    return out


def _mixture_problems(cfg: ml_collections.ConfigDict) -> list[str]:
    """The mixture (`data.sources`) and the stages (`config.stages`): their form, and the steps they cover."""
    if _get(cfg, "data") is _MISSING or not all(isinstance(_get(cfg, k), int) for k in ("batch_size", "seq_len",
                                                                                       "steps")):
        return []  # reported by the bounds
    try:
        plan = stage_plan(cfg)
    except ConfigError as e:
        return [f"{e}"]
    if _set(cfg, "stages") and cfg.steps > plan[-1].end:
        return [f"config.steps={cfg.steps} goes past the {plan[-1].end} steps of config.stages; set steps <= "
                f"{plan[-1].end} or lengthen the last stage"]
    if parse_sources(cfg.data) is not None and _get(cfg, "task") not in (_MISSING, Task.PRETRAIN.value):
        return [f"{_show('task', cfg.task)}: config.data.sources (a mixture) is for task=pretrain; give SFT / DPO "
                "one data.path"]
    return []


CHECKS: tuple[Callable[..., list[str]], ...] = (_bound_problems, _choice_problems, _path_problems, _schedule_problems,
                                                _source_problems, _mixture_problems)


def problems(cfg: ml_collections.ConfigDict, process_count: int = 1) -> list[str]:
    """Every problem of `cfg`, one line each (empty when the config is valid)."""
    found = [p for check in CHECKS for p in check(cfg)]
    return found + _combination_problems(cfg, process_count)


def validate(cfg: ml_collections.ConfigDict, process_count: int = 1) -> None:
    """Raises `RunConfigError` listing every problem of `cfg` (see `problems`); returns None when it is valid."""
    found = problems(cfg, process_count)
    if len(found) == 1:
        raise RunConfigError(found[0])
    if found:
        raise RunConfigError(f"{len(found)} problems in the run config:\n  " + "\n  ".join(found))


def evaluates(cfg: ml_collections.ConfigDict, start: int) -> bool:
    """Whether steps `start + 1 .. cfg.steps` include a held-out evaluation (a multiple of `eval_every`)."""
    every = int(cfg.eval_every or 0)
    return every > 0 and cfg.steps // every > start // every

