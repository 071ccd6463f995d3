"""Optimizer and learning-rate schedules for training Ling models.

Two pieces, both built from `ml_collections.ConfigDict` sections of a run recipe:

* `make_schedule(cfg.schedule)`: an Optax schedule (step -> learning rate).
  `ScheduleKind.WARMUP_COSINE` is the usual linear warmup + cosine decay;
  `ScheduleKind.PHASES` composes a list of phases with `optax.join_schedules`,
  which expresses the Ling-Coder-Lite recipe (linear warmup, multi-step
  constant, cosine decay, inverse-square-root annealing) or any subset of it.
* `make_optimizer(cfg.optimizer, schedule)`: global-norm clipping followed by
  AdamW, with weight decay masked off the norm scales and biases
  (`decay_mask`).

Gradient accumulation is the train step's job (`ling_jax.train.step`), not the
optimizer's.

Phase semantics (`ScheduleKind.PHASES`): phase i covers steps
[b_i, b_i + steps_i), where b_i is the sum of the earlier phases' lengths; a
phase sees the step relative to its own start, t = step - b_i. A phase starts
from the value the previous phase ended at (the first from `init_value`)
unless it is given `start` (or `value` / `values`). After the last phase the
schedule holds the last phase's end value.
"""

from __future__ import annotations

import enum
import itertools
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ling_jax.config import ConfigError


class ScheduleKind(enum.Enum):
    """The schedule families `make_schedule` builds."""

    WARMUP_COSINE = "warmup_cosine"
    PHASES = "phases"


class PhaseKind(enum.Enum):
    """One phase of a `ScheduleKind.PHASES` schedule; t is the step relative to the phase start."""

    LINEAR = "linear"  # start -> end linearly over `steps`
    CONSTANT = "constant"  # `value` (default: the previous end) for `steps`
    MULTISTEP = "multistep"  # values[i] after the i-th of `boundaries` (relative to the phase start)
    COSINE = "cosine"  # half-cosine from start to `end` over `steps`
    INVERSE_SQRT = "inverse_sqrt"  # start * (1 + t / tau) ** -0.5, rescaled to reach `end` at `steps`


# Keys a phase may carry, per kind (besides `kind` and `steps`).
_PHASE_KEYS: dict[PhaseKind, frozenset[str]] = {
    PhaseKind.LINEAR: frozenset({"start", "end"}),
    PhaseKind.CONSTANT: frozenset({"value"}),
    PhaseKind.MULTISTEP: frozenset({"boundaries", "values"}),
    PhaseKind.COSINE: frozenset({"start", "end"}),
    PhaseKind.INVERSE_SQRT: frozenset({"start", "end", "tau"}),
}

# Leaf names that never get weight decay: RMSNorm scales and the attention biases.
NO_DECAY_NAMES: frozenset[str] = frozenset({"scale", "bias", "q_bias", "k_bias", "v_bias", "o_bias"})


def default_schedule_config() -> ml_collections.ConfigDict:
    """The `schedule` section of a run recipe, every field documented.

    `kind` picks which of the other fields are read: `warmup_cosine` reads
    `init_value`, `peak_value`, `warmup_steps`, `decay_steps`, `end_value`;
    `phases` reads `init_value` and `phases`.
    """
    cfg = ml_collections.ConfigDict()
    cfg.kind = ScheduleKind.WARMUP_COSINE.value  # a `ScheduleKind` value: "warmup_cosine" or "phases"
    cfg.init_value = 0.0  # learning rate at step 0 (warmup_cosine), or the value the first phase starts from
    cfg.peak_value = 3e-4  # warmup_cosine: learning rate reached at the end of the warmup
    cfg.warmup_steps = 2000  # warmup_cosine: steps of linear warmup from init_value to peak_value
    cfg.decay_steps = 100_000  # warmup_cosine: step (counted from 0, warmup included) at which end_value is reached
    cfg.end_value = 3e-5  # warmup_cosine: final learning rate, held after decay_steps
    # phases: the Ling-Coder-Lite recipe shape (lengths are illustrative). Each entry is a dict with `kind`
    # (a `PhaseKind` value), `steps` (its length, >= 1) and the kind's own keys:
    #   linear:       start (optional), end
    #   constant:     value (optional: the previous end)
    #   multistep:    boundaries (steps relative to the phase start, increasing, in (0, steps)),
    #                 values (one more than boundaries; values[i] holds from the i-th boundary on)
    #   cosine:       start (optional), end (the floor)
    #   inverse_sqrt: start (optional), end, tau (optional timescale in steps; see `inverse_sqrt_schedule`)
    cfg.phases = [
        dict(kind=PhaseKind.LINEAR.value, steps=2000, end=3e-4),
        dict(kind=PhaseKind.MULTISTEP.value, steps=60_000, boundaries=[20_000, 40_000], values=[3e-4, 2e-4, 1e-4]),
        dict(kind=PhaseKind.COSINE.value, steps=30_000, end=3e-5),
        dict(kind=PhaseKind.INVERSE_SQRT.value, steps=8000, end=1e-5),
    ]
    return cfg


def paper_schedule_config() -> ml_collections.ConfigDict:
    """`default_schedule_config()` switched to the phased Ling-Coder-Lite recipe."""
    cfg = default_schedule_config()
    cfg.kind = ScheduleKind.PHASES.value
    return cfg


def default_optimizer_config() -> ml_collections.ConfigDict:
    """The `optimizer` section of a run recipe (the learning rate comes from the schedule)."""
    cfg = ml_collections.ConfigDict()
    cfg.b1 = 0.9  # AdamW first-moment decay
    cfg.b2 = 0.95  # AdamW second-moment decay
    cfg.eps = 1e-8  # AdamW denominator epsilon (added to sqrt of the second moment)
    cfg.weight_decay = 0.1  # decoupled decay, multiplied by the learning rate; not applied to norms and biases
    cfg.clip_norm = 1.0  # clip gradients to this global L2 norm before AdamW; None disables clipping
    # dtype name of the first moment (e.g. "bfloat16" to save memory); None: the params' dtype. A typed
    # placeholder, so that `--config.optimizer.mu_dtype=bfloat16` works on the command line.
    cfg.mu_dtype = ml_collections.config_dict.placeholder(str)
    return cfg


def linear_schedule(start: float, end: float, steps: int) -> optax.Schedule:
    """lr(t) = start + (end - start) * min(t, steps) / steps."""
    return optax.linear_schedule(start, end, steps)


def constant_schedule(value: float) -> optax.Schedule:
    """lr(t) = value."""
    return optax.constant_schedule(value)


def multistep_schedule(boundaries: Sequence[int], values: Sequence[float]) -> optax.Schedule:
    """lr(t) = values[i], i = number of boundaries <= t (so values[0] before boundaries[0]).

    Raises:
      ValueError: `len(values) != len(boundaries) + 1` or boundaries not strictly increasing.
    """
    if len(values) != len(boundaries) + 1:
        raise ConfigError(f"multistep needs one more value than boundaries, got {len(values)} values "
                         f"and {len(boundaries)} boundaries")
    if any(b1 >= b2 for b1, b2 in itertools.pairwise(boundaries)):
        raise ConfigError(f"multistep boundaries must be strictly increasing, got {list(boundaries)}")
    bounds = jnp.asarray(boundaries, jnp.int32)
    vals = jnp.asarray(values, jnp.float32)

    def schedule(count: jax.Array) -> jax.Array:
        return vals[jnp.sum(jnp.asarray(count) >= bounds)]

    return schedule


def cosine_schedule(start: float, end: float, steps: int) -> optax.Schedule:
    """lr(t) = end + (start - end) * (1 + cos(pi * min(t, steps) / steps)) / 2."""

    def schedule(count: jax.Array) -> jax.Array:
        frac = jnp.clip(jnp.asarray(count, jnp.float32) / steps, 0.0, 1.0)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def inverse_sqrt_tau(start: float, end: float, steps: int) -> float:
    """The timescale for which `inverse_sqrt_schedule` is exactly start / sqrt(1 + t / tau).

    Raises:
      ValueError: unless 0 < end < start (the pure form cannot reach `end` otherwise).
    """
    if not 0.0 < end < start:
        raise ConfigError(f"inverse_sqrt without tau needs 0 < end < start, got start={start}, end={end}; give tau")
    return steps / ((start / end) ** 2 - 1.0)


def inverse_sqrt_schedule(start: float, end: float, steps: int, tau: float | None = None) -> optax.Schedule:
    """Inverse-square-root annealing from `start` to exactly `end` over `steps`.

    With g(t) = 1 / sqrt(1 + t / tau) and s = min(t, steps):

        lr(t) = end + (start - end) * (g(s) - g(steps)) / (1 - g(steps))

    so lr(0) = start and lr(steps) = end, with the inverse-square-root shape in
    between. When `tau` is None it is `steps / ((start / end)**2 - 1)`, for which
    g(steps) = end / start and the formula reduces to the plain
    lr(t) = start / sqrt(1 + t / tau) (needs 0 < end < start).

    Raises:
      ValueError: `tau` <= 0, or `tau` None with end outside (0, start).
    """
    tau = inverse_sqrt_tau(start, end, steps) if tau is None else float(tau)
    if tau <= 0:
        raise ConfigError(f"inverse_sqrt tau must be > 0, got {tau}")
    g_end = 1.0 / math.sqrt(1.0 + steps / tau)

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.clip(jnp.asarray(count, jnp.float32), 0.0, steps)
        g = jax.lax.rsqrt(1.0 + t / tau)
        return end + (start - end) * (g - g_end) / (1.0 - g_end)

    return schedule


def _phase_header(phase: Mapping[str, Any], where: str) -> tuple[PhaseKind, int]:
    """A phase's kind and step count, its keys checked against the kind's."""
    try:
        kind = PhaseKind(phase["kind"])
    except (KeyError, ValueError):
        raise ConfigError(f"{where}: kind must be one of {[k.value for k in PhaseKind]}, "
                          f"got {phase.get('kind')!r}") from None
    unknown = set(phase.keys()) - {"kind", "steps"} - _PHASE_KEYS[kind]
    if unknown:
        raise ConfigError(f"{where} ({kind.value}): unknown keys {sorted(unknown)}; "
                          f"allowed: {sorted(_PHASE_KEYS[kind] | {'kind', 'steps'})}")
    try:
        steps = operator.index(phase.get("steps"))
    except TypeError:
        steps = None
    if steps is None or steps < 1:
        raise ConfigError(f"{where} ({kind.value}): steps must be an int >= 1, got {phase.get('steps')!r}")
    return kind, steps


def _phase(phase: Mapping[str, Any], previous: float, index: int) -> tuple[optax.Schedule, int, float]:
    """One phase's schedule, its length and the value it ends at."""
    where = f"schedule phase {index}"
    kind, steps = _phase_header(phase, where)

    def need(key: str) -> Any:
        if phase.get(key) is None:
            raise ConfigError(f"missing {key!r}")
        return phase[key]

    start = float(phase["start"]) if phase.get("start") is not None else previous
    try:
        match kind:
            case PhaseKind.LINEAR:
                end = float(need("end"))
                return linear_schedule(start, end, steps), steps, end
            case PhaseKind.CONSTANT:
                value = float(phase["value"]) if phase.get("value") is not None else previous
                return constant_schedule(value), steps, value
            case PhaseKind.MULTISTEP:
                boundaries, values = [int(b) for b in need("boundaries")], [float(v) for v in need("values")]
                if boundaries and not 0 < boundaries[0] <= boundaries[-1] < steps:
                    raise ConfigError(f"boundaries must lie in (0, {steps}), got {boundaries}")
                return multistep_schedule(boundaries, values), steps, values[-1]
            case PhaseKind.COSINE:
                end = float(need("end"))
                return cosine_schedule(start, end, steps), steps, end
            case PhaseKind.INVERSE_SQRT:
                end = float(need("end"))
                return inverse_sqrt_schedule(start, end, steps, phase.get("tau")), steps, end
    except ConfigError as e:  # the schedule functions' own checks, named with the phase
        raise ConfigError(f"{where} ({kind.value}): {e}") from None


def phases_schedule(phases: Sequence[Mapping[str, Any]], init_value: float = 0.0) -> optax.Schedule:
    """Join phases (see the module docstring) with `optax.join_schedules`.

    Args:
      phases: dicts with `kind` (a `PhaseKind` value), `steps` and the kind's keys
        (see `default_schedule_config`).
      init_value: the value the first phase starts from unless it gives its own.

    Returns:
      The schedule; with no phases, the constant `init_value`.

    Raises:
      ValueError: a malformed phase (the message names its index).
    """
    schedules, boundaries, value, step = [], [], float(init_value), 0
    for i, phase in enumerate(phases):
        schedule, steps, value = _phase(phase, value, i)
        if schedules:
            boundaries.append(step)
        schedules.append(schedule)
        step += steps
    if not schedules:
        return constant_schedule(float(init_value))
    return optax.join_schedules(schedules, boundaries)


def schedule_steps(cfg: ml_collections.ConfigDict) -> int:
    """The step at which the schedule of `cfg` reaches its final value (0 for an empty phase list).

    Train recipes can use it as the default number of training steps.
    """
    if ScheduleKind(cfg.kind) is ScheduleKind.WARMUP_COSINE:
        return int(cfg.decay_steps)
    return sum(int(p["steps"]) for p in cfg.phases)


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning-rate schedule of a `schedule` config section.

    `warmup_cosine` is built as the two phases linear(init -> peak, warmup_steps)
    and cosine(peak -> end, decay_steps - warmup_steps).

    Args:
      cfg: a `schedule` section (see `default_schedule_config`).

    Returns:
      A jit-compatible function from the step (int array) to a float32 learning rate.

    Raises:
      ValueError: unknown kind or inconsistent fields.
    """
    try:
        kind = ScheduleKind(cfg.kind)
    except ValueError:
        raise ConfigError(f"schedule kind must be one of {[k.value for k in ScheduleKind]}, got {cfg.kind!r}") from None
    match kind:
        case ScheduleKind.WARMUP_COSINE:
            warmup, decay = int(cfg.warmup_steps), int(cfg.decay_steps)
            if not 0 <= warmup < decay:
                raise ConfigError(f"warmup_cosine needs 0 <= warmup_steps < decay_steps, got {warmup}, {decay}")
            phases = [dict(kind=PhaseKind.COSINE.value, steps=decay - warmup, start=float(cfg.peak_value),
                           end=float(cfg.end_value))]
            if warmup:
                phases.insert(0, dict(kind=PhaseKind.LINEAR.value, steps=warmup, end=float(cfg.peak_value)))
            return phases_schedule(phases, float(cfg.init_value))
        case ScheduleKind.PHASES:
            return phases_schedule(list(cfg.phases), float(cfg.init_value))


def _leaf_name(path: tuple[Any, ...]) -> str:
    """The last key of a pytree path as a string (dict key, attribute or index)."""
    if not path:
        return ""
    last = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(last, attr):
            return str(getattr(last, attr))
    return str(last)


def decay_mask(params: Any) -> Any:
    """Pytree of bools like `params`: True where AdamW applies weight decay.

    False for leaves named in `NO_DECAY_NAMES` (the RMSNorm `scale`s and the
    attention `q_bias` / `k_bias` / `v_bias` / `o_bias`); True for everything
    else (embeddings, projections, experts, router, lm_head).

    Args:
      params: a parameter pytree of `ling_jax.LingForCausalLM` (arrays or
        `jax.ShapeDtypeStruct`s); only the leaf names matter.

    Returns:
      A pytree of Python bools with the structure of `params`.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) not in NO_DECAY_NAMES, params)


def make_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule | float
                   ) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the decay mask of `decay_mask`.

    Args:
      cfg: an `optimizer` section (see `default_optimizer_config`).
      schedule: the learning rate, a schedule from `make_schedule` or a constant.

    Returns:
      The transformation; its `update(grads, state, params)` needs `params`
      (for weight decay).

    Raises:
      ValueError: a negative weight decay or a non-positive clip norm.
    """
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    mu_dtype = None if cfg.get("mu_dtype") is None else jnp.dtype(cfg.mu_dtype)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask, mu_dtype=mu_dtype)
    if cfg.clip_norm is None:
        return adamw
    if cfg.clip_norm <= 0:
        raise ConfigError(f"clip_norm must be > 0 or None, got {cfg.clip_norm}")
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
