"""Reading and validating the curation config: bounded fields, choices, and the error naming the field.

Each operator declares its thresholds as a frozen dataclass whose fields are `bounded(default, lo, hi)`;
`section(cls, cfg, prefix)` reads a config section into it, checking every value's type and range, and
raises `CurationConfigError` naming the field, the value and the accepted range. `choice(cfg, name, Enum)`
does the same for an enum field.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, TypeVar

import ml_collections

from ling_jax.config import UserError
from ling_jax.data.settings import parse_choice

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


class CurationConfigError(UserError):
    """A curation config field with a bad value (the message names the field, the value and the fix)."""


def bounded(default: float | int | bool, lo: float | None = None, hi: float | None = None) -> Any:
    """A dataclass field with a default and an inclusive accepted range (None: unbounded on that side)."""
    return dataclasses.field(default=default, metadata={"range": (lo, hi)})


def _check(name: str, value: Any, kind: type, lo: float | None, hi: float | None) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise CurationConfigError(f"{name}={value!r} is not a boolean: set it to True or False")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise CurationConfigError(f"{name}={value!r} is not a string: set it to a string")
        return value
    numeric = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise CurationConfigError(f"{name}={value!r} is not a {kind.__name__}: set it to a number")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        accepted = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        raise CurationConfigError(f"{name}={value!r} is out of range {accepted}: set {name} inside it")
    return kind(value)


def section(cls: type[T], cfg: ml_collections.ConfigDict | None, prefix: str) -> T:
    """The dataclass `cls` read from the config section `cfg` (missing fields take their defaults).

    Raises:
      CurationConfigError: A field of the wrong type or out of range, or a key `cls` does not know.
    """
    cfg = cfg if cfg is not None else ml_collections.ConfigDict()
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.keys()) - set(known))
    if unknown:
        raise CurationConfigError(f"{prefix}.{unknown[0]} is not a field of {prefix}: accepted {sorted(known)}")
    values = {}
    types = {"int": int, "float": float, "bool": bool, "str": str}
    for name, f in known.items():
        lo, hi = f.metadata.get("range", (None, None))
        value = cfg.get(name, f.default)
        values[name] = _check(f"{prefix}.{name}", value, types[str(f.type)], lo, hi)
    return cls(**values)


def choice(value: Any, name: str, choices: type[E]) -> E:
    """The member of `choices` named by `value`.

    Raises:
      CurationConfigError: No member has that value (the message lists the accepted values).
    """
    return parse_choice(value, name, choices, CurationConfigError)
