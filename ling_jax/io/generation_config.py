"""A checkpoint's generation defaults: `generation_config.json`, read as `transformers` reads it.

`GenerationDefaults.from_dir` reads the end-of-sequence ids (`eos_token_id`, an
id or a list of ids: any of them ends a reply) and the sampling defaults
(`do_sample`, `temperature`, `top_k`, `top_p`, `max_new_tokens`). As in
`transformers`, `do_sample: false` (or absent) means greedy decoding, and with
`do_sample: true` an unset `temperature` is 1.0 and an unset `top_k` is 50.
`resolve` applies command-line values over them: a flag that is given wins.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ling_jax.config import UserError

FILE = "generation_config.json"
_HF_TOP_K = 50  # transformers' GenerationConfig default


class GenerationConfigError(UserError):
    """A generation_config.json that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint asks of generation (`temperature` 0 = greedy)."""

    eos_token_ids: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    source: str = ""  # the file read ("" = none)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> GenerationDefaults:
        """The defaults of `directory`'s generation_config.json (all unset when there is none).

        Raises:
          GenerationConfigError: not a JSON object, or a key of the wrong type (named with the file).
        """
        path = os.path.join(os.fspath(directory), FILE)
        if not os.path.isfile(path):
            return cls()
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GenerationConfigError(f"could not parse {path}: {e}; fix or delete it") from None
        if not isinstance(data, dict):
            raise GenerationConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")

        def number(key: str, kind: type, default: Any = None) -> Any:
            value = data.get(key)
            if value is None:
                return default
            if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and value != int(value)):
                raise GenerationConfigError(f"{path}: {key} must be a{'n integer' if kind is int else ' number'}, "
                                            f"got {value!r}")
            return kind(value)

        eos = data.get("eos_token_id")
        eos = [] if eos is None else (eos if isinstance(eos, list) else [eos])
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos):
            raise GenerationConfigError(f"{path}: eos_token_id must be a token id or a list of them, got "
                                        f"{data.get('eos_token_id')!r}")
        sample = bool(data.get("do_sample", False))
        top_p = number("top_p", float)
        return cls(tuple(eos), number("temperature", float, 1.0) if sample else 0.0,
                   number("top_k", int, _HF_TOP_K) or None if sample else None,
                   top_p if sample and top_p is not None and top_p < 1.0 else None,
                   number("max_new_tokens", int), path)

    def resolve(self, *, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                max_new_tokens: int | None = None, default_max_new_tokens: int = 64) -> GenerationDefaults:
        """These defaults with the values given (not None) put over them; `temperature=0` turns sampling off."""
        greedy = temperature == 0.0 if temperature is not None else self.temperature == 0.0
        return dataclasses.replace(
            self, temperature=self.temperature if temperature is None else temperature,
            top_k=None if greedy else (self.top_k if top_k is None else top_k),
            top_p=None if greedy else (self.top_p if top_p is None else top_p),
            max_new_tokens=max_new_tokens or self.max_new_tokens or default_max_new_tokens)
