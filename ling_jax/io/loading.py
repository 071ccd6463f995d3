"""What weights and config a path holds, and `from_pretrained`, which loads any of them.

`resolve_checkpoint` is the one place that answers "where are the weights and
the config of this path". It recognises three kinds of directory
(`CheckpointKind`):

* `HF`: a Hugging Face directory, `config.json` plus single or sharded
  safetensors (`ling_jax.io.safetensors`);
* `CONVERTED`: a directory written by `convert_weights.py hf-to-jax`
  (`ling_jax_checkpoint.json`, `config.json`, the parameters as an Orbax
  checkpoint under `params/`; `ling_jax.io.convert`);
* `TRAIN_STEP`: a `train.py` checkpoint step `WORKDIR/checkpoints/N` (the train
  state under `state/`, the model's config.json as the `model_config/` item;
  `ling_jax.train.checkpointing`), also when named by its `state/` item.
  A `train.py` workdir resolves to its latest step.

`from_pretrained` loads any of them into `(model, params)`; `init_config` and
`load_init_params` are the same resolution for `config.init_from`. `CheckpointPath.tokenizer_dir`
is where its tokenizer files are (for a train step: the step, else its run's workdir, where
`train.py` keeps the run's tokenizer); `copy_tokenizer_files` puts a tokenizer there. `find_config`
is the looser search `convert_weights.py jax-to-hf` uses for an arbitrary Orbax
checkpoint: a config in the directory or up to two directories above it.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from ling_jax.config import ConfigError, LingConfig
from ling_jax.io.hf_names import CheckpointNotFoundError, from_hf_state_dict
from ling_jax.io.hub import TOKENIZER_FILES, TOKENIZER_GLOBS, local_path
from ling_jax.io.orbax_params import is_converted_checkpoint, restore_params
from ling_jax.io.safetensors import SafetensorsCheckpoint
from ling_jax.model.quantization import Quantization, quantize_params
from ling_jax.model.transformer import LingForCausalLM

CONFIG_FILE = "config.json"
TRAIN_CHECKPOINTS = "checkpoints"  # WORKDIR/checkpoints/<step>/
TRAIN_STATE_ITEM = "state"  # the TrainState item of a step; its parameters are at key `params`
TRAIN_CONFIG_ITEM = os.path.join("model_config", "metadata")  # the config.json dict a step saves as JSON
_TOKENIZER_MAIN = ("tokenizer.json", "tokenizer.model")  # the files `load_tokenizer` reads a directory by
_KINDS = ("a Hugging Face directory (config.json + safetensors), a convert_weights.py hf-to-jax output, "
          "or a train.py workdir or checkpoint step (WORKDIR/checkpoints/N)")


class CheckpointKind(enum.Enum):
    """The kinds of directory `resolve_checkpoint` recognises; the value says what it is, for messages."""

    HF = "a Hugging Face checkpoint"
    CONVERTED = "a convert_weights.py hf-to-jax output"
    TRAIN_STEP = "a train.py checkpoint step"


@dataclasses.dataclass(frozen=True)
class CheckpointPath:
    """Where the weights and the config of one checkpoint are (made by `resolve_checkpoint`)."""

    kind: CheckpointKind
    path: str  # the checkpoint directory, absolute (for a workdir: its latest step)
    config_file: str  # its config.json, or a train step's `model_config` item

    def config(self, **runtime: Any) -> LingConfig:
        """The checkpoint's `LingConfig`, with `runtime` fields (`attention_impl`, `gmm_impl`, `remat`)."""
        return read_config(self.config_file, **runtime)

    @property
    def workdir(self) -> str | None:
        """The train.py workdir of a `TRAIN_STEP` (`WORKDIR/checkpoints/N` -> `WORKDIR`), else None."""
        if self.kind is not CheckpointKind.TRAIN_STEP:
            return None
        return os.path.dirname(os.path.dirname(self.path))

    @property
    def tokenizer_dir(self) -> str:
        """The directory of the checkpoint's tokenizer: the checkpoint itself, or for a train.py step without
        tokenizer files of its own, its run's workdir (where `train.py` keeps the run's tokenizer)."""
        if self.workdir is not None and not has_tokenizer(self.path) and has_tokenizer(self.workdir):
            return self.workdir
        return self.path

    def params(self, config: LingConfig, dtype: Any, *, progress: bool = False) -> dict[str, Any]:
        """The parameters (a pytree of `jax.Array` on the default device) in `dtype`, checked against `config`.

        Raises:
          CheckpointError: missing / misshapen / unexpected tensors (all listed) or unreadable files.
        """
        if self.kind is CheckpointKind.HF:
            wrap = (lambda it: tqdm(it, desc="loading", unit="tensor")) if progress else None
            tensors = SafetensorsCheckpoint(self.path)
            return jax.tree.map(jnp.asarray, from_hf_state_dict(tensors, config, dtype=jnp.dtype(dtype), progress=wrap))
        if self.kind is CheckpointKind.CONVERTED:
            return restore_params(self.path, dtype=dtype, config=config)
        return restore_params(os.path.join(self.path, TRAIN_STATE_ITEM), dtype=dtype, params_key="params",
                              config=config)


def has_tokenizer(directory: str) -> bool:
    """Whether `directory` holds a `tokenizer.json` or a `tokenizer.model`."""
    return any(os.path.isfile(os.path.join(directory, name)) for name in _TOKENIZER_MAIN)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies a tokenizer into directory `dst`: a tokenizer directory's files (`TOKENIZER_FILES`), or one
    tokenizer file (a SentencePiece `.model` becomes `tokenizer.model`, a `.json` `tokenizer.json`).

    Each file is written under a temporary name and renamed, so a reader never sees half a file.

    Returns:
      The names written in `dst`.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.isdir(src):
        pairs = [(n, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
        pairs += sorted({(os.path.basename(p),) * 2 for g in TOKENIZER_GLOBS for p in glob.glob(os.path.join(src, g))})
    else:
        pairs = [(os.path.basename(src), "tokenizer.model" if src.endswith(".model") else "tokenizer.json")]
        src = os.path.dirname(src)
    for name, target in pairs:
        if os.path.abspath(os.path.join(src, name)) == os.path.abspath(os.path.join(dst, target)):
            continue
        tmp = os.path.join(dst, f".{target}.tmp{os.getpid()}")
        shutil.copyfile(os.path.join(src, name), tmp)
        os.replace(tmp, os.path.join(dst, target))
    return [target for _, target in pairs]


def load_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object of a config.json file.

    Raises:
      CheckpointNotFoundError: `path` does not exist.
      ConfigError: not a JSON object (the message names the file).
    """
    path = os.fspath(path)
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"config file {path} does not exist: pass the model's config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): fix it or re-download the checkpoint") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} holds a JSON {type(d).__name__}, not an object: point at the model's config.json")
    return d


def read_config(path: str | os.PathLike, **runtime: Any) -> LingConfig:
    """The `LingConfig` of a config.json file (errors name the file)."""
    try:
        return LingConfig.from_hf_dict(load_config_dict(path), **runtime)
    except ConfigError as e:
        raise ConfigError(f"{os.fspath(path)}: {e}") from None


def _config_file(directory: str) -> str | None:
    """`directory`'s config.json, else its train.py `model_config` item, else None."""
    for name in (CONFIG_FILE, TRAIN_CONFIG_ITEM):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def _latest_step(workdir: str, what: str) -> str:
    """The newest step directory of a train.py workdir (Orbax names unfinished saves `N.orbax-checkpoint-tmp-*`)."""
    ckpts = os.path.join(workdir, TRAIN_CHECKPOINTS)
    steps = [int(d) for d in os.listdir(ckpts) if d.isdigit() and os.path.isdir(os.path.join(ckpts, d))]
    if not steps:
        raise CheckpointNotFoundError(f"{workdir} is a train.py workdir without a finished checkpoint (none in "
                                      f"{ckpts}): train until one is saved, or point {what} at {_KINDS}")
    return os.path.join(ckpts, str(max(steps)))


def resolve_checkpoint(path: str | os.PathLike, what: str = "the path") -> CheckpointPath:
    """What checkpoint `path` is, and where its weights and config are.

    Args:
      path: a Hugging Face directory, a converted directory, a train.py checkpoint step (or its
        `state/` item) or a train.py workdir (its latest step); `~` is expanded. A Hub id
        `org/name[@revision]` that is no local path is its snapshot in the Hub cache (`ling_jax.io.hub`).
      what: how messages name the path (`"config.init_from"`, `"--model"`).

    Raises:
      CheckpointNotFoundError: `path` does not exist, holds none of those, or is a workdir without
        a finished checkpoint (the message names the path and what to point at).
    """
    path = os.path.abspath(os.path.expanduser(local_path(path, what)))  # a Hub id: its local snapshot
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path} does not exist: point {what} at {_KINDS}")
    if is_converted_checkpoint(path):
        return CheckpointPath(CheckpointKind.CONVERTED, path, os.path.join(path, CONFIG_FILE))
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return CheckpointPath(CheckpointKind.HF, path, os.path.join(path, CONFIG_FILE))
    if os.path.isdir(os.path.join(path, TRAIN_CHECKPOINTS)):
        path = _latest_step(path, what)
    elif os.path.basename(path) == TRAIN_STATE_ITEM and os.path.isfile(os.path.join(path, "..", TRAIN_CONFIG_ITEM)):
        path = os.path.dirname(path)  # a step's state/ item
    if os.path.isfile(os.path.join(path, TRAIN_CONFIG_ITEM)):
        return CheckpointPath(CheckpointKind.TRAIN_STEP, path, os.path.join(path, TRAIN_CONFIG_ITEM))
    raise CheckpointNotFoundError(f"{path} has no {CONFIG_FILE}, no {TRAIN_CHECKPOINTS}/ and no model_config/ "
                                  f"item: point {what} at {_KINDS}")


def load_config(path: str | os.PathLike, **runtime: Any) -> LingConfig:
    """The `LingConfig` of any checkpoint `resolve_checkpoint` recognises, with `runtime` fields."""
    return resolve_checkpoint(path).config(**runtime)


def find_config(ckpt: str | os.PathLike, config_path: str | os.PathLike | None = None) -> str:
    """The config.json for an Orbax checkpoint: `config_path` (a file or a directory), else found near `ckpt`.

    Looked for in `ckpt` and up to two directories above it: `config.json`, or the
    `model_config/metadata` JSON item that train.py checkpoints save beside `state/`.

    Raises:
      CheckpointNotFoundError: none found (the message says to pass --config).
    """
    if config_path is not None:
        path = os.fspath(config_path)
        path = os.path.join(path, CONFIG_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"config file {path} does not exist: pass the model's config.json "
                                          "as --config")
        return path
    here = os.path.abspath(os.fspath(ckpt))
    for _ in range(3):
        if found := _config_file(here):
            return found
        here = os.path.dirname(here)
    raise CheckpointNotFoundError(f"no config.json in {ckpt} or its parents: pass the model's config.json "
                                  "as --config")


def from_pretrained(path: str, dtype: Any = jnp.float32, *, param_dtype: Any = None,
                    progress: bool = False, quantize: str | None = None, quantize_group_size: int | None = None,
                    **runtime: Any):
    """Loads a checkpoint directory into `(model, params)`.

    Args:
      path: a Hugging Face checkpoint directory (`config.json` plus single or sharded
        safetensors) or Hub id (`org/name[@revision]`, fetched into the Hub cache), a directory
        written by `convert_weights.py hf-to-jax`, a train.py checkpoint step or a train.py
        workdir (its latest step); see `resolve_checkpoint`.
      dtype: compute dtype of the returned model.
      param_dtype: dtype of the returned parameters (default: `dtype`).
      progress: show a per-tensor progress bar (Hugging Face directories).
      quantize: "int8" for int8 weights (`ling_jax.model.quantization`; checked before loading).
      quantize_group_size: with `quantize`, one scale per this many input rows instead of per channel.
      **runtime: `LingConfig` runtime fields (`attention_impl`, `gmm_impl`, `remat`).

    Returns:
      `(LingForCausalLM, params)` with params a plain pytree of `jax.Array`.

    Raises:
      CheckpointNotFoundError: `path` holds no checkpoint, or files of it are missing.
      CheckpointError: missing / misshapen / unexpected tensors (all listed) or unreadable files.
      ConfigError: an unsupported or invalid config.json.
      QuantizeError: an unknown `quantize` scheme or a group size that does not divide a weight.
    """
    scheme = None if quantize is None else Quantization.parse(quantize)
    ckpt = resolve_checkpoint(path)
    config = ckpt.config(**runtime)
    param_dtype = dtype if param_dtype is None else param_dtype
    model = LingForCausalLM(config, dtype=dtype, param_dtype=param_dtype)
    params = ckpt.params(config, param_dtype, progress=progress)
    if scheme is not None:
        params = quantize_params(params, scheme, group_size=quantize_group_size,
                                 tied_embeddings=config.tie_word_embeddings)
    return model, params


def resolve_init_path(path: str) -> str:
    """The checkpoint directory `config.init_from` names (for a train.py workdir, its latest step).

    Raises:
      CheckpointNotFoundError: as `resolve_checkpoint`.
    """
    return resolve_checkpoint(path, "config.init_from").path


def init_config(path: str) -> LingConfig:
    """The architecture of the checkpoint `config.init_from` names (its config.json or model_config item)."""
    return resolve_checkpoint(path, "config.init_from").config()


def load_init_params(path: str, config: LingConfig, dtype: Any) -> Any:
    """The parameters of `config.init_from` (on the default device), in `dtype`.

    Raises:
      CheckpointNotFoundError: `path` holds no checkpoint.
      CheckpointError: missing or misshapen parameters for `config` (all listed).
    """
    return resolve_checkpoint(path, "config.init_from").params(config, dtype)
