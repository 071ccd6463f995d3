"""Orbax checkpoints of the parameter tree, written and read in bounded memory.

`restore_params` loads a converted directory (`ling_jax.io.convert`, layout
there) or any Orbax PyTree checkpoint holding the parameters as a pytree of
`jax.Array`; `save_streamed` and `ParamsReader` are the bounded-memory writer
and reader the converters use. `resolve_params_location` finds the parameter
tree in a directory (a converted directory, an Orbax item, a step directory
with one item, and a key inside the saved tree); every leaf is checked against
the config's shapes (`expected_shapes`) before anything is read.

Every leaf of `params/` is one Zarr array in the leaf's dtype. Stacked leaves are
chunked one slice per layer (`[1, ...]`), expert weights one per layer and expert
(`[1, 1, D, F]`), so reading back one Hugging Face tensor reads one chunk. It is a
standard Orbax checkpoint::

    restore_params(OUT)                                    # every leaf, as jax.Array
    restore_params(OUT, keys=[("moe_layers", "mlp", "router")])  # only chosen leaves
    ocp.PyTreeCheckpointer().restore(f"{OUT}/params")      # plain Orbax (NumPy leaves)

Memory: `save_streamed` writes one leaf after another, each streamed slice by
slice (one Hugging Face tensor read at a time) into a TensorStore transaction that
is committed every `flush_bytes` (64 MiB; one OCDBT data file per commit); nothing
holds a whole leaf, let alone the model. `ParamsReader` reads just the slices
that each exported tensor needs. Peak memory is therefore the runtime plus a few
copies of the largest single tensor (the embedding) plus about three write
buffers, independent of the number of layers and experts.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import type_handlers

from ling_jax.config import LingConfig
from ling_jax.io import integrity
from ling_jax.io.hf_names import CheckpointError, CheckpointNotFoundError, Path, leaf_sources
from ling_jax.model.params import abstract_params

MARKER = "ling_jax_checkpoint.json"
PARAMS_DIR = "params"
FORMAT = "ling_jax.params"
FORMAT_VERSION = 1
DEFAULT_FLUSH_BYTES = 64 * 2**20
_ORBAX_METADATA = "_METADATA"


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedArray:
    """A leaf to save whose data arrives in slices: `fill()` yields `(index, array)` pairs covering it."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    fill: Callable[[], Iterable[tuple[tuple[int, ...], np.ndarray]]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class _StreamingHandler(type_handlers.NumpyHandler):
    """Writes `StreamedArray` leaves one after another in `NumpyHandler`'s format (restored as `np.ndarray`)."""

    def __init__(self, flush_bytes: int):
        super().__init__(deepcopy_host_arrays=False)
        self._flush_bytes = flush_bytes

    async def _write(self, value: StreamedArray, info: type_handlers.ParamInfo, arg: type_handlers.SaveArgs):
        await info.await_path_creation()
        tspec = type_handlers.get_json_tspec_write(
            info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.chunk_shape,
            dtype=value.dtype, process_index=jax.process_index(), arg=arg)
        store = await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)
        txn, pending = ts.Transaction(), 0
        for index, part in value.fill():
            await store.with_transaction(txn)[index].write(part, can_reference_source_data_indefinitely=True)
            pending += part.nbytes
            del part
            if pending >= self._flush_bytes:
                await txn.commit_async()
                txn, pending = ts.Transaction(), 0
        await txn.commit_async()

    async def _write_all(self, values, infos, args):
        for value, info, arg in zip(values, infos, args, strict=True):
            await self._write(value, info, arg)

    async def serialize(self, values: Sequence[StreamedArray], infos: Sequence[type_handlers.ParamInfo],
                        args: Sequence[type_handlers.SaveArgs] | None = None) -> list[ocp.future.Future]:
        args = args or [type_handlers.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos, args),
                                                                 name="ling_jax_streaming")]


def save_streamed(directory: str, tree: dict[str, Any], flush_bytes: int = DEFAULT_FLUSH_BYTES) -> None:
    """Saves a tree of `StreamedArray` leaves as an Orbax PyTree checkpoint, one leaf at a time.

    Args:
      directory: the checkpoint directory to create (must not exist).
      tree: nested dicts of `StreamedArray`.
      flush_bytes: commit the buffered writes whenever this many bytes are pending.
    """
    registry = type_handlers.create_type_handler_registry(
        (jax.Array, type_handlers.get_type_handler(jax.Array)), (StreamedArray, _StreamingHandler(flush_bytes)))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=True, use_zarr3=True, type_handler_registry=registry)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(epath.Path(directory), args=ocp.args.PyTreeSave(tree))


def is_converted_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by `convert_hf_to_orbax`."""
    return os.path.isfile(os.path.join(path, MARKER))


def _parse_key(key: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """`"state.params"`, `"state/params"` or `("state", "params")` -> `("state", "params")`; None stays None."""
    if key is None:
        return None
    if isinstance(key, str):
        return tuple(k for k in key.replace("/", ".").split(".") if k)
    return tuple(key)


def resolve_params_location(path: str | os.PathLike, params_key: str | Sequence[str] | None = None
                            ) -> tuple[str, tuple[str, ...] | None]:
    """`(orbax_dir, key)`: where the parameter tree lives in a converted or an Orbax PyTree checkpoint.

    Raises:
      CheckpointNotFoundError: `path` is neither (the message lists the item directories it contains).
      DamagedCheckpointError: the checkpoint's manifest (`ling_jax.io.integrity`) names missing or truncated files.

    A directory holding exactly one PyTree item (a `CheckpointManager` step
    directory such as `checkpoints/2000/` with `state/`) resolves to that item.
    """
    path = os.path.abspath(os.fspath(path))  # Orbax wants absolute paths
    integrity.check(path)  # missing or truncated files, by name, before TensorStore reads a chunk
    if is_converted_checkpoint(path):
        with open(os.path.join(path, MARKER)) as f:
            marker = json.load(f)
        return os.path.join(path, marker.get("params", PARAMS_DIR)), _parse_key(params_key) or ()
    if os.path.isfile(os.path.join(path, _ORBAX_METADATA)):
        return path, _parse_key(params_key)
    items = sorted(os.path.join(path, d) for d in (os.listdir(path) if os.path.isdir(path) else [])
                   if os.path.isfile(os.path.join(path, d, _ORBAX_METADATA)))
    if len(items) == 1:  # a CheckpointManager step directory with one PyTree item (e.g. `state/`)
        return items[0], _parse_key(params_key)
    hint = f"; it holds Orbax items {', '.join(items)}: pass one of those" if items else ""
    if not items and os.path.isfile(os.path.join(path, "config.json")) and glob.glob(f"{path}/*.safetensors"):
        hint = "; it is a Hugging Face checkpoint: convert it with hf-to-jax first"
    raise CheckpointNotFoundError(f"{path} is neither a converted checkpoint (no {MARKER}) nor an Orbax PyTree "
                            f"checkpoint (no {_ORBAX_METADATA}){hint}")


def flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Nested dicts -> `{leaf path: leaf}`."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def unflatten(leaves: dict[Path, Any], prefix: Path = ()) -> dict[str, Any]:
    """`{leaf path: leaf}` -> nested dicts, each path placed under `prefix` (the inverse of `flatten`)."""
    tree: dict[str, Any] = {}
    for path, leaf in leaves.items():
        node = tree
        for k in prefix + path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return tree


def _select(tree: Any, key: tuple[str, ...] | None, where: str) -> tuple[Any, tuple[str, ...]]:
    """`(subtree, key)`: the parameter subtree at `key`; `None` means the root, or `params` when it has one."""
    if key is None:
        key = ("params",) if isinstance(tree, dict) and "embed" not in tree and "params" in tree else ()
    node = tree
    for i, k in enumerate(key):
        if not isinstance(node, dict) or k not in node:
            keys = sorted(node) if isinstance(node, dict) else []
            raise CheckpointError(f"{where} has no key {'.'.join(key[:i + 1])!r} (keys there: "
                                  f"{', '.join(map(str, keys)) or 'none'}); pass the path of the parameter "
                                  "tree with --params-key")
        node = node[k]
    return node, key


def _check_leaves(leaves: dict[Path, Any], config: LingConfig, where: str) -> None:
    """Raises `CheckpointError` listing every missing, misshapen or unexpected leaf (`leaves`: Orbax metadata)."""
    found = {p: tuple(getattr(m, "shape", ())) for p, m in leaves.items()}
    expected = expected_shapes(config)
    problems = [f"missing parameter {'/'.join(p)} (expected shape {s})" for p, s in expected.items()
                if p not in found]
    problems += [f"{'/'.join(p)}: expected shape {s}, found {found[p]}" for p, s in expected.items()
                 if p in found and found[p] != s]
    problems += [f"unexpected parameter {'/'.join(p)} (shape {found[p]})" for p in sorted(set(found) - set(expected))]
    if problems:
        raise CheckpointError(f"{where}: {len(problems)} parameter(s) do not match the config:\n  "
                              + "\n  ".join(problems))


def expected_shapes(config: LingConfig) -> dict[Path, tuple[int, ...]]:
    """The shape of every parameter leaf of `config`, by leaf path."""
    return {p: tuple(s.shape) for p, s in flatten(abstract_params(config)).items()}


class ParamsReader:
    """Reads slices `leaf[index]` of the parameters in an Orbax checkpoint, never whole leaves.

    Checkpoints written here are chunked per slice. For checkpoints with coarser
    chunks (e.g. training checkpoints), a TensorStore cache holding one chunk per
    leaf avoids decoding a chunk again for each slice.
    """

    def __init__(self, path: str | os.PathLike, config: LingConfig, params_key: str | Sequence[str] | None = None):
        """Opens the checkpoint and checks every leaf against `config`.

        Raises:
          CheckpointNotFoundError: not a checkpoint directory.
          CheckpointError: a missing, misshapen or unexpected parameter (all listed), or a bad `params_key`.
        """
        self.directory, key = resolve_params_location(path, params_key)
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory))
        self.leaves = flatten(_select(meta.tree, key, self.directory)[0])
        _check_leaves(self.leaves, config, self.directory)
        self._context = ts.Context({"file_io_concurrency": {"limit": 128},
                                    "cache_pool": {"total_bytes_limit": self._cache_bytes(config)},
                                    "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
        self._ocdbt = type_handlers.is_ocdbt_checkpoint(epath.Path(self.directory))
        self._zarr3 = bool(getattr(meta, "use_zarr3", False))
        self._stores: dict[Path, ts.TensorStore] = {}

    def _cache_bytes(self, config: LingConfig) -> int:
        """One chunk (plus 1/8) of every leaf whose chunks span more than one slice, 0 for per-slice chunks."""
        depth = {path: len(srcs[0].index) for path, srcs in leaf_sources(config).items()}
        cache = 0
        for p, m in self.leaves.items():
            chunk = getattr(m.storage, "chunk_shape", None) or m.shape
            if any(c > 1 for c in chunk[:depth[p]]):
                cache += int(np.prod(chunk, dtype=np.int64)) * np.dtype(m.dtype).itemsize * 9 // 8
        return cache

    def dtype(self, path: Path) -> np.dtype:
        """The stored dtype of a leaf."""
        return np.dtype(self.leaves[path].dtype)

    def read(self, path: Path, index: tuple[int, ...]) -> np.ndarray:
        """`leaf[index]` as a NumPy array in the stored dtype."""
        if path not in self._stores:
            info = type_handlers.ParamInfo(name=self.leaves[path].name, parent_dir=epath.Path(self.directory),
                                           is_ocdbt_checkpoint=self._ocdbt, use_zarr3=self._zarr3,
                                           ts_context=self._context)
            spec = type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            self._stores[path] = ts.open(ts.Spec(spec), open=True, read=True, context=self._context).result()
        return self._stores[path][index].read().result()


def restore_params(path: str | os.PathLike, *, dtype: Any = None, keys: Iterable[Path] | None = None,
                   params_key: str | Sequence[str] | None = None, config: LingConfig | None = None,
                   sharding: jax.sharding.Sharding | Callable[[Path], jax.sharding.Sharding] | None = None
                   ) -> dict[str, Any]:
    """Restores parameters from a converted directory or any Orbax PyTree checkpoint.

    Args:
      path: a converted directory (`convert_hf_to_orbax`) or an Orbax PyTree checkpoint directory.
      dtype: cast every leaf to this dtype (default: as stored).
      keys: restore only these leaf paths (tuples such as `("moe_layers", "mlp", "gate_proj")`).
      params_key: where the parameter tree sits in the saved tree (`"params"`, `"state.params"`);
        default: the root, or `params` when the root has it.
      config: when given, every leaf is checked against it first.
      sharding: where the arrays go: one sharding for every leaf, or a function of the
        leaf path (e.g. from `ling_jax.logical_axes` and a mesh); default: the first device.

    Returns:
      The parameter tree (nested dicts of `jax.Array`), with only `keys` when given.

    Raises:
      CheckpointNotFoundError: `path` is not a checkpoint directory.
      CheckpointError: missing / misshapen / unexpected parameters (all listed) or an unknown key.
    """
    directory, key = resolve_params_location(path, params_key)
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory)).tree
    sub, key = _select(tree, key, directory)
    leaves = flatten(sub)
    if config is not None:
        _check_leaves(leaves, config, directory)
    if keys is not None:
        keys = [tuple(k) for k in keys]
        if unknown := [k for k in keys if k not in leaves]:
            raise CheckpointError(f"{directory} has no parameter(s) {', '.join('/'.join(k) for k in unknown)}")
        leaves = {k: leaves[k] for k in keys}
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding_of = sharding if callable(sharding) else lambda _: sharding
    item = unflatten({p: jax.ShapeDtypeStruct(m.shape, m.dtype) for p, m in leaves.items()}, key)
    args = unflatten({p: ocp.ArrayRestoreArgs(sharding=sharding_of(p), dtype=dtype, global_shape=m.shape)
                      for p, m in leaves.items()}, key)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        out = checkpointer.restore(epath.Path(directory), args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
    for k in key:
        out = out[k]
    return out
