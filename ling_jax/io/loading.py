"""Loading models: `from_pretrained` for every kind of directory, config discovery, `init_from` resolution.

One place answers "where are the weights and the config of this path":
* a Hugging Face directory (`config.json` plus single or sharded safetensors);
* a directory written by `convert_weights.py hf-to-jax` (an Orbax checkpoint,
  `ling_jax.io.orbax_params`);
* a `train.py` checkpoint step directory (`WORKDIR/checkpoints/N`) or a
  `train.py` workdir (its latest checkpoint), for `config.init_from`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from ling_jax.config import LingConfig
from ling_jax.io.hf_names import from_hf_state_dict
from ling_jax.io.orbax_params import is_converted_checkpoint, restore_params
from ling_jax.io.safetensors import SafetensorsCheckpoint
from ling_jax.model.transformer import LingForCausalLM


def load_config(path: str, **runtime: Any) -> LingConfig:
    """The `LingConfig` of a checkpoint directory."""
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{path} has no config.json: point at a checkpoint directory")
    return LingConfig.from_json_file(config_path, **runtime)


def find_config(ckpt: str, config_path: str | os.PathLike | None = None) -> str:
    """The config.json for a checkpoint: `config_path` (a file or a directory), else found near `ckpt`.

    Looked for in `ckpt` and up to two directories above it: `config.json`, or the
    `model_config/metadata` JSON item that training checkpoints save beside `state/`.

    Raises:
      FileNotFoundError: none found (the message says to pass --config).
    """
    if config_path is not None:
        path = os.fspath(config_path)
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist: pass the model's config.json as --config")
        return path
    here = os.path.abspath(ckpt)
    for _ in range(3):
        for name in ("config.json", os.path.join("model_config", "metadata")):
            if os.path.isfile(os.path.join(here, name)):
                return os.path.join(here, name)
        here = os.path.dirname(here)
    raise FileNotFoundError(f"no config.json in {ckpt} or its parents: pass the model's config.json as --config")


def from_pretrained(path: str, dtype: Any = jnp.float32, *, param_dtype: Any = None,
                    progress: bool = False, **runtime: Any):
    """Loads a checkpoint directory into `(model, params)`.

    Args:
      path: a Hugging Face checkpoint directory (`config.json` plus single or
        sharded safetensors), or a directory written by `convert_weights.py
        hf-to-jax` (detected by its `ling_jax_checkpoint.json`).
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

    path = os.fspath(path)
    config = load_config(path, **runtime)
    param_dtype = dtype if param_dtype is None else param_dtype
    model = LingForCausalLM(config, dtype=dtype, param_dtype=param_dtype)
    if is_converted_checkpoint(path):
        return model, restore_params(path, dtype=param_dtype, config=config)
    wrap = None
    if progress:
        from tqdm import tqdm

        wrap = lambda it: tqdm(it, desc="loading", unit="tensor")  # noqa: E731
    tensors = SafetensorsCheckpoint(path)
    np_params = from_hf_state_dict(tensors, config, dtype=jnp.dtype(param_dtype), progress=wrap)
    return model, jax.tree.map(jnp.asarray, np_params)


def resolve_init_path(path: str) -> str:
    """`path`, or for a `train.py` workdir its latest checkpoint step directory.

    Raises:
      FileNotFoundError: `path` does not exist, or a workdir without a finished checkpoint.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.init_from {path} does not exist; point it at a convert_weights.py "
                                "output, a Hugging Face directory or a train.py workdir / checkpoint step")
    ckpts = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpts) and not os.path.isfile(os.path.join(path, "config.json")):
        steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit() and os.path.isdir(os.path.join(ckpts, d)))
        if not steps:
            raise FileNotFoundError(f"config.init_from {path} is a train.py workdir without checkpoints")
        return os.path.join(ckpts, str(steps[-1]))
    return path


def init_config(path: str) -> LingConfig:
    """The architecture of the checkpoint `config.init_from` names (its config.json or model_config item)."""
    path = resolve_init_path(path)
    with open(find_config(path)) as f:
        return LingConfig.from_hf_dict(json.load(f))


def load_init_params(path: str, config: LingConfig, dtype: Any) -> Any:
    """The parameters of `config.init_from` (on the default device), in `dtype`.

    Raises:
      CheckpointError: missing or misshapen parameters for `config` (all listed).
    """
    path = resolve_init_path(path)
    if is_converted_checkpoint(path) or os.path.isfile(os.path.join(path, "config.json")):
        return from_pretrained(path, dtype=dtype, param_dtype=dtype)[1]
    return restore_params(path, dtype=dtype, params_key="params", config=config)
