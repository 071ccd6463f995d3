"""Streamed conversion between Hugging Face safetensors and converted Orbax directories, both ways.

`convert_hf_to_orbax` and `convert_orbax_to_hf` are the two directions of
`convert_weights.py` (`ling_jax.cli.convert`); `copy_aux_files` carries the
generation config, tokenizer files and model code along. Layout of a converted
directory::

    OUT/
      config.json                 the Hugging Face config.json, verbatim
      generation_config.json      copied from the source when present, as are the
      tokenizer.json, ..., *.py   tokenizer files and the remote model code
      params/                     an Orbax PyTree checkpoint (OCDBT, Zarr v3) of the
                                  parameter tree of `ling_jax.model` (`init_params` layout)
      ling_jax_checkpoint.json    {"format": "ling_jax.params", "version": 1,
                                   "params": "params", "dtype": ...}; written last

Memory: one leaf is built and written at a time, one Hugging Face tensor read at
a time (`ling_jax.io.orbax_params.save_streamed`); exports read only the slices
each tensor needs (`ParamsReader`). Peak memory is the runtime plus a few copies
of the largest single tensor plus the write buffers. Outputs go through
`ling_jax.io.atomic.atomic_output_dir`.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from ling_jax.config import DType, LingConfig
from ling_jax.io.atomic import atomic_output_dir, check_output_dir
from ling_jax.io.hf_names import (
    CheckpointError,
    CheckpointNotFoundError,
    Path,
    check_tensors,
    iter_leaf_slices,
    leaf_sources,
    merge_tensor,
    slice_shape,
    tensor_specs,
)
from ling_jax.io.hub import TOKENIZER_FILES, TOKENIZER_GLOBS
from ling_jax.io.integrity import write_manifest
from ling_jax.io.loading import (
    CONFIG_FILE,
    CheckpointKind,
    CheckpointPath,
    find_config,
    load_config_dict,
    read_config,
    resolve_checkpoint,
)
from ling_jax.io.orbax_params import (
    DEFAULT_FLUSH_BYTES,
    FORMAT,
    FORMAT_VERSION,
    MARKER,
    PARAMS_DIR,
    ParamsReader,
    StreamedArray,
    expected_shapes,
    is_converted_checkpoint,
    save_streamed,
    unflatten,
)
from ling_jax.io.safetensors import SafetensorsCheckpoint, TensorEntry, write_hf_shards

# Files besides the weights that travel with a checkpoint (copied when present).
AUX_FILES = ("generation_config.json", *TOKENIZER_FILES)
AUX_GLOBS = (*TOKENIZER_GLOBS, "*.py")


def copy_aux_files(src: str, dst: str) -> list[str]:
    """Copies the generation config, tokenizer files and `*.py` model code from `src` to `dst`.

    Returns:
      The names copied (existing files in `dst` are replaced).
    """
    names = [n for n in AUX_FILES if os.path.isfile(os.path.join(src, n))]
    names += sorted({os.path.basename(p) for g in AUX_GLOBS for p in glob.glob(os.path.join(src, g))})
    for name in names:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return names


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _storage_dtype(dtype: DType | str | None) -> np.dtype | None:
    """The NumPy dtype of a `dtype` argument (a `DType` or its name); None keeps each tensor's own."""
    return None if dtype is None else DType.parse(dtype, "dtype").numpy


def _hf_source(hf_dir: str) -> CheckpointPath:
    """`hf_dir` resolved, which must be a Hugging Face directory."""
    source = resolve_checkpoint(hf_dir, "--hf-dir")
    if source.kind is not CheckpointKind.HF:
        raise CheckpointError(f"--hf-dir {source.path} is {source.kind.value}, not a Hugging Face checkpoint: "
                              "point it at the directory holding config.json and the *.safetensors files "
                              "(jax-to-hf exports ling_jax checkpoints)")
    return source


def _streamed_leaves(tensors: SafetensorsCheckpoint, config: LingConfig, dtype: np.dtype | None,
                     on_tensor: Callable[[], Any]) -> dict[Path, StreamedArray]:
    """Every parameter leaf as a `StreamedArray` filled from `tensors` (dtype None: the tensors' own)."""
    hf_dtypes = tensors.dtypes()
    shapes = expected_shapes(config)
    leaves = {}
    for path, srcs in leaf_sources(config).items():
        leaf_dtype = dtype or np.result_type(*(hf_dtypes[s.spec.hf_name] for s in srcs))
        leaves[path] = StreamedArray(shapes[path], leaf_dtype, slice_shape(shapes[path], len(srcs[0].index)),
                                     functools.partial(iter_leaf_slices, tensors, srcs, leaf_dtype, on_tensor))
    return leaves


def convert_hf_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: DType | str | None = None,
                        overwrite: bool = False, progress: bool = False,
                        flush_bytes: int = DEFAULT_FLUSH_BYTES) -> str:
    """Converts a Hugging Face checkpoint directory into a converted Orbax directory, streaming.

    One leaf is built and written at a time, one Hugging Face tensor read at a
    time; peak memory is about one tensor plus `flush_bytes` plus the runtime.

    Args:
      hf_dir: `config.json` plus single or sharded safetensors.
      out_dir: the directory to create (layout in the module docstring).
      dtype: storage dtype (a `DType` or its name); default: each leaf keeps its tensors' dtype (bit-exact).
      overwrite: replace an existing `out_dir`.
      progress: show a per-tensor progress bar.
      flush_bytes: buffered bytes per TensorStore commit.

    Returns:
      The output directory.

    Raises:
      OutputDirError: `out_dir` exists (without `overwrite`) or would replace `hf_dir`.
      CheckpointNotFoundError: `hf_dir` or files it lists are missing.
      CheckpointError: not a Hugging Face directory, unreadable files, or missing / misshapen / unexpected
        tensors (all listed).
      ConfigError: an invalid config.json or `dtype`.
    """
    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    check_output_dir(out_dir, overwrite, inputs=[hf_dir])
    storage = _storage_dtype(dtype)
    source = _hf_source(hf_dir)
    config = source.config()
    tensors = SafetensorsCheckpoint(source.path)
    check_tensors(tensors.shapes(), config)
    bar = tqdm(total=len(tensors), desc="hf-to-jax", unit="tensor", disable=not progress)
    leaves = _streamed_leaves(tensors, config, storage, bar.update)
    dtypes = {leaf.dtype.name for leaf in leaves.values()}
    with atomic_output_dir(out_dir, overwrite) as tmp, bar:
        save_streamed(os.path.join(tmp, PARAMS_DIR), unflatten(leaves), flush_bytes)
        shutil.copyfile(source.config_file, os.path.join(tmp, CONFIG_FILE))
        copy_aux_files(source.path, tmp)
        _write_json(os.path.join(tmp, MARKER), {"format": FORMAT, "version": FORMAT_VERSION, "params": PARAMS_DIR,
                                                "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed"})
        write_manifest(tmp)  # last: the sizes of everything above, checked by every reader
    return out_dir


def _exported_config(hf_config: dict[str, Any], entries: Sequence[TensorEntry]) -> dict[str, Any]:
    """`hf_config` with its dtype keys (`torch_dtype`, `dtype`) set to the exported dtype, when there is one."""
    names = {e.dtype.name for e in entries}
    if len(names) != 1:
        return hf_config
    name = names.pop()
    return {k: name if k in ("torch_dtype", "dtype") else v for k, v in hf_config.items()}


def _write_export_files(out: str, hf_config: dict[str, Any], aux_sources: Sequence[str]) -> None:
    """Writes config.json and the aux files of an export; generation_config.json from the config if none came."""
    for src in aux_sources:
        copy_aux_files(src, out)
    _write_json(os.path.join(out, CONFIG_FILE), hf_config)
    if not os.path.exists(os.path.join(out, "generation_config.json")):
        keys = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")
        _write_json(os.path.join(out, "generation_config.json"),
                    {"_from_model_config": True, **{k: hf_config[k] for k in keys if k in hf_config}})


def _train_step(ckpt: str) -> CheckpointPath | None:
    """The train.py step `ckpt` names (a step, its state/ item, or a workdir: its latest step), else None."""
    if is_converted_checkpoint(ckpt):
        return None
    try:
        found = resolve_checkpoint(ckpt)
    except CheckpointNotFoundError:  # an arbitrary Orbax checkpoint
        return None
    return found if found.kind is CheckpointKind.TRAIN_STEP else None


def convert_orbax_to_hf(ckpt: str | os.PathLike, out_dir: str | os.PathLike, *,
                        config_path: str | os.PathLike | None = None, params_key: str | Sequence[str] | None = None,
                        max_shard_bytes: int = 5 * 10**9, dtype: DType | str | None = None,
                        reference_dir: str | os.PathLike | None = None, overwrite: bool = False,
                        progress: bool = False) -> str:
    """Writes a Hugging Face checkpoint directory from a converted or training (Orbax) checkpoint, streaming.

    Shards are written one tensor at a time from the parameter slices that tensor
    needs, so peak memory is about one tensor plus the runtime.

    Args:
      ckpt: a converted directory, a train.py step or workdir (its latest step), or an Orbax PyTree checkpoint
        holding the parameters.
      out_dir: the directory to create: `model-0000N-of-0000M.safetensors`, the index,
        `config.json`, `generation_config.json` (plus tokenizer files and `*.py` when available).
      config_path: the model's config.json (default: found next to or above `ckpt`).
      params_key: path of the parameter tree in the saved tree (default: root, or `params`).
      max_shard_bytes: shard size limit.
      dtype: output dtype (a `DType` or its name; default: each tensor as stored, a bit-exact round trip).
      reference_dir: a checkpoint to copy tokenizer files, generation config and `*.py` from: the original
        Hugging Face directory, or any path `resolve_checkpoint` takes (a train.py workdir: its tokenizer).
        Without it, a train.py step brings its run's tokenizer (`CheckpointPath.tokenizer_dir`).
      overwrite: replace an existing `out_dir`.
      progress: show a per-tensor progress bar.

    Returns:
      The output directory.

    Raises:
      OutputDirError: `out_dir` exists (without `overwrite`) or would replace an input.
      CheckpointNotFoundError: `ckpt`, its config or `reference_dir` missing.
      CheckpointError: missing / misshapen / unexpected parameters (all listed) or a bad `params_key`.
      ConfigError: an invalid config.json or `dtype`.
    """
    ckpt, out_dir = os.fspath(ckpt), os.fspath(out_dir)
    refs = [os.fspath(reference_dir)] if reference_dir is not None else []
    check_output_dir(out_dir, overwrite, inputs=[ckpt, *refs])
    out_dtype = _storage_dtype(dtype)
    refs = [resolve_checkpoint(r, "--reference-dir").tokenizer_dir for r in refs]
    step = _train_step(ckpt)
    if step is not None and os.path.basename(ckpt.rstrip(os.sep)) != "state":
        ckpt = step.path  # a workdir: its latest step
    config_file = find_config(ckpt, config_path)
    hf_config, config = load_config_dict(config_file), read_config(config_file)
    reader = ParamsReader(ckpt, config, params_key)
    specs = {s.hf_name: s for s in tensor_specs(config)}
    entries = [TensorEntry(s.hf_name, out_dtype or reader.dtype(s.targets[0][0]), s.hf_shape)
               for s in specs.values()]
    out_dtypes = {e.name: e.dtype for e in entries}
    bar = tqdm(total=len(entries), desc="jax-to-hf", unit="tensor", disable=not progress)

    def produce(name: str) -> np.ndarray:
        arr = merge_tensor(specs[name], reader.read, out_dtypes[name])
        bar.update()
        return arr

    with atomic_output_dir(out_dir, overwrite) as tmp, bar:
        write_hf_shards(tmp, entries, produce, max_shard_bytes)
        _write_export_files(tmp, _exported_config(hf_config, entries),
                            ([ckpt] if is_converted_checkpoint(ckpt) else []) +
                            ([step.tokenizer_dir] if step is not None else []) + refs)  # the run's tokenizer
    return out_dir
