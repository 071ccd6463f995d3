"""Loading Hugging Face checkpoint directories: `from_pretrained`.

A directory holds `config.json` and either `model.safetensors` or shards
listed by `model.safetensors.index.json`. Tensors are read lazily, one at a
time, through `SafetensorsCheckpoint`, so loading needs the model's memory plus
one tensor, never a second copy of the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from ling_jax.config import LingConfig
from ling_jax.convert import CheckpointError, from_hf_state_dict

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsCheckpoint(Mapping[str, np.ndarray]):
    """A read-only name -> NumPy array view over (sharded) safetensors files.

    Tensors are loaded on access; `shapes()` reads only the headers.
    """

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            self.weight_map = None
        else:
            raise FileNotFoundError(
                f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}: point at a Hugging Face "
                "checkpoint directory")
        files = sorted(set(self.weight_map.values())) if self.weight_map else [SINGLE_FILE]
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise FileNotFoundError(f"shard file(s) listed in {INDEX_FILE} are missing from "
                                    f"{directory}: {', '.join(missing)}")
        self._handles = {}
        for name in files:
            try:
                self._handles[name] = safe_open(os.path.join(directory, name), framework="np")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{os.path.join(directory, name)} is not a readable "
                                      f"safetensors file ({e}); re-download or re-convert it") from e
        if self.weight_map is None:
            self.weight_map = {k: SINGLE_FILE for k in self._handles[SINGLE_FILE].keys()}  # noqa: SIM118

    def __getitem__(self, name: str) -> np.ndarray:
        handle = self._handles[self.weight_map[name]]
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.weight_map[name]}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape, from the file headers only."""
        out = {}
        for name, file in self.weight_map.items():
            try:
                out[name] = tuple(self._handles[file].get_slice(name).get_shape())
            except Exception as e:
                raise CheckpointError(f"{file} does not contain tensor {name} listed in the index") from e
        return out


def load_config(path: str, **runtime: Any) -> LingConfig:
    """The `LingConfig` of a checkpoint directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path} has no config.json: point at a checkpoint directory")
    return LingConfig.from_json_file(config_path, **runtime)


def from_pretrained(path: str, dtype: Any = jnp.float32, *, param_dtype: Any = None,
                    progress: bool = False, **runtime: Any):
    """Loads a checkpoint directory into `(model, params)`.

    Args:
      path: a Hugging Face checkpoint directory (`config.json` plus single or
        sharded safetensors).
      dtype: compute dtype of the returned model.
      param_dtype: dtype of the returned parameters (default: `dtype`).
      progress: show a per-tensor progress bar.
      **runtime: `LingConfig` runtime fields (`attention_impl`, `gmm_impl`, `remat`).

    Returns:
      `(LingForCausalLM, params)` with params a plain pytree of `jax.Array`.

    Raises:
      CheckpointError: missing / misshapen / unexpected tensors (all listed) or unreadable files.
      ConfigError: an unsupported or invalid config.json.
    """
    from ling_jax.model import LingForCausalLM

    config = load_config(path, **runtime)
    param_dtype = dtype if param_dtype is None else param_dtype
    wrap = None
    if progress:
        from tqdm import tqdm

        wrap = lambda it: tqdm(it, desc="loading", unit="tensor")  # noqa: E731
    tensors = SafetensorsCheckpoint(path)
    np_params = from_hf_state_dict(tensors, config, dtype=jnp.dtype(param_dtype), progress=wrap)
    params = jax.tree.map(jnp.asarray, np_params)
    return LingForCausalLM(config, dtype=dtype, param_dtype=param_dtype), params
