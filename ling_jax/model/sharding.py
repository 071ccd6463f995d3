"""Device mesh, logical-axis rules and their validation.

The mesh has four named axes, `MESH_AXES` (code names them by the constants
`DATA_AXIS`, `FSDP_AXIS`, `EXPERT_AXIS`, `TENSOR_AXIS`):

* `data`: pure data parallelism (the batch is split, parameters replicated).
* `fsdp`: data parallelism with the `embed` dimension of every weight split
  (ZeRO-3 style: gathered for use, gradients reduce-scattered).
* `expert`: the batch is split *and* the experts are spread over it (expert
  parallelism, see `ling_jax.model.expert_parallel`).
* `tensor`: heads, ffn features and the vocabulary split (Megatron style);
  activations are replicated over it.

The batch dimension of the inputs goes over `data`, `fsdp` and `expert`
together (`DATA_AXES`). Every parameter and activation carries logical axis
names (see `ling_jax.model.layers`); `LOGICAL_RULES` maps each logical name to mesh
axes (the first rule for a name wins). XLA's SPMD partitioner inserts the
collectives for everything except the routed experts, which run under an
explicit `jax.shard_map`.

Activating a mesh: `with use_mesh(mesh):` sets it with `jax.set_mesh` and
enters `nn.logical_axis_rules(LOGICAL_RULES)`, so that the model's
`nn.with_logical_constraint` annotations take effect and the MoE layers pick
the expert-parallel path; `with_mesh(fn, mesh)` wraps a (jitted) function so
that it is traced under the mesh.

Validation (`validate_config`, `validate_shardings`) runs on shapes only and
raises `ShardingError` before anything is compiled: a rule that puts two
logical axes of one array on the same mesh axis, or a dimension that its mesh
axes do not divide; the message names the logical axis (or config field) and
the mesh axis.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ling_jax.config import LingConfig, UserError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
MESH_AXES = (DATA_AXIS, FSDP_AXIS, EXPERT_AXIS, TENSOR_AXIS)
DATA_AXES = (DATA_AXIS, FSDP_AXIS, EXPERT_AXIS)  # The batch dimension is split over these.

Rules = Sequence[tuple[str, Any]]

# Logical axis name -> mesh axis (or axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", DATA_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", TENSOR_AXIS),
    ("activation_kv_heads", TENSOR_AXIS),
    ("layers", None),
    ("vocab", TENSOR_AXIS),
    ("embed", FSDP_AXIS),
    ("norm", None),
    ("q_heads", TENSOR_AXIS),
    ("kv_heads", TENSOR_AXIS),
    ("head_dim", None),
    ("mlp", TENSOR_AXIS),
    ("expert", EXPERT_AXIS),
    ("expert_embed", FSDP_AXIS),
    ("expert_mlp", TENSOR_AXIS),
    ("expert_router", None),
)

# The activation annotations of the model (`nn.with_logical_constraint` in
# `layers`, `attention` and `transformer`), checked by `validate_shardings`.
ACTIVATION_SPECS: tuple[tuple[str, ...], ...] = (
    ("activation_batch", "activation_length", "activation_embed"),
    ("activation_batch", "activation_length", "activation_heads", "head_dim"),
    ("activation_batch", "activation_length", "activation_kv_heads", "head_dim"),
    ("activation_batch", "activation_length", "mlp"),
)


class ShardingError(UserError):
    """A mesh, rule or shape that cannot be sharded; the message names the axes involved."""


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes `MESH_AXES` of the given sizes (missing axes are 1).

    A size of -1 (at most one) takes all remaining devices.

    Raises:
      ShardingError: unknown axis names, or sizes whose product is not the device count.
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ShardingError("at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh axis sizes must be positive (or -1), got {dict(zip(MESH_AXES, sizes, strict=True))}")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = max(len(devices) // rest, 1)
    if int(np.prod(sizes)) != len(devices):
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
                            f"but {len(devices)} are available; make the product of the axis sizes match")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def mesh_is_parallel(mesh: Mesh | jax.sharding.AbstractMesh | None) -> bool:
    """True when `mesh` is set and has more than one device: the MoE then runs expert-parallel and the
    Pallas kernels (splash attention, grouped matmul) run per device under `jax.shard_map`."""
    return mesh is not None and not mesh.empty and math.prod(mesh.axis_sizes) > 1


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Iterator[Mesh]:
    """Sets `mesh` (`jax.set_mesh`) and the logical-axis rules for the code inside (outside `jit`)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def with_mesh(fn: Callable[..., Any], mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Callable[..., Any]:
    """`fn` called inside `use_mesh(mesh, rules)`; wrap a `jax.jit` function so it traces under the mesh."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with use_mesh(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def logical_shardings(logical_specs: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """`NamedSharding`s for a pytree of logical `PartitionSpec`s."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def like_params(tree: Any, abstract_params: Any, param_shardings: Any, default: Any) -> Any:
    """Shardings for a pytree that holds parameter-shaped leaves, e.g. an optimizer state.

    A leaf whose key path ends with a parameter's key path and has that parameter's
    shape (Adam's `mu` / `nu`, whatever their dtype) takes the parameter's sharding;
    every other leaf (step counts, scalars) takes `default`.
    """
    by_path = {tuple(path): (leaf.shape, sh) for (path, leaf), sh in zip(
        jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_shardings), strict=True)}

    def pick(path: tuple, leaf: Any) -> Any:
        for i in range(len(path)):
            shape, sh = by_path.get(tuple(path[i:]), (None, None))
            if sh is not None:
                return sh if shape == leaf.shape else default
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def axes_dividing(mesh: Mesh | jax.sharding.AbstractMesh, axes: Sequence[str], n: int) -> tuple[str, ...] | None:
    """Those of `axes` the mesh has, when together they divide a dimension of size `n`; else None (replicate).

    For the `shard_map` specs of code that splits what it can (a one-row batch stays whole)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    present = tuple(a for a in axes if sizes.get(a, 1) > 1)
    return present if present and n % math.prod(sizes[a] for a in present) == 0 else None


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [B, T] input arrays: B over every data-parallel axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXES))


def mesh_axes_of(logical: str | None, rules: Rules = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes a logical axis name maps to (the first matching rule; () if none)."""
    for name, target in rules:
        if name == logical:
            if target is None:
                return ()
            return (target,) if isinstance(target, str) else tuple(target)
    return ()


def _sizes(mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def check_spec(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh | jax.sharding.AbstractMesh,
               rules: Rules = LOGICAL_RULES, what: str = "array",
               fields: Sequence[str | None] | None = None) -> None:
    """Checks one array: no mesh axis used twice, every dimension divisible by its mesh axes.

    Args:
      shape: the array's shape.
      logical: one logical axis name (or None) per dimension.
      mesh: the (abstract) mesh.
      rules: the logical-axis rules.
      what: the array's name, for the message.
      fields: optional config field name per dimension, named in the message instead of the size alone.

    Raises:
      ShardingError: naming the logical axes (or config fields) and the mesh axis.
    """
    sizes = _sizes(mesh)
    owner: dict[str, str] = {}
    for dim, (n, name) in enumerate(zip(shape, logical, strict=True)):
        axes = mesh_axes_of(name, rules)
        for axis in axes:
            if axis not in sizes:
                raise ShardingError(f"{what}: logical axis {name!r} maps to mesh axis {axis!r}, which the mesh "
                                    f"{sizes} does not have")
            if axis in owner:
                raise ShardingError(f"{what}: logical axes {owner[axis]!r} and {name!r} both map to mesh axis "
                                    f"{axis!r}; change the rules so that each mesh axis shards one dimension")
            owner[axis] = name
        split = math.prod(sizes[a] for a in axes)
        if n % split:
            field = fields[dim] if fields is not None else None
            subject = f"{field} ({n})" if field else f"dimension {dim} (size {n})"
            over = (f"mesh axis {axes[0]!r} (size {split})" if len(axes) == 1
                    else f"mesh axes {axes} (size {split} together)")
            raise ShardingError(f"{what}: {subject}, logical axis {name!r}, is not divisible by {over}")


def validate_shardings(abstract_params: Any, logical_specs: Any, mesh: Mesh | jax.sharding.AbstractMesh,
                       rules: Rules = LOGICAL_RULES) -> None:
    """Checks every parameter (and the model's activation annotations) against the mesh and rules.

    Args:
      abstract_params: pytree of arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).
      logical_specs: the same tree of logical `PartitionSpec`s (`ling_jax.logical_axes`).
      mesh: the (abstract) device mesh.
      rules: the logical-axis rules.

    Raises:
      ShardingError: two logical axes of one array on one mesh axis, or a
        dimension not divisible by its mesh axes; the message names the
        parameter, the logical axis and the mesh axis.
    """
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    specs = jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=is_spec)
    leaves = jax.tree.leaves(abstract_params)
    if len(specs) != len(leaves):
        raise ShardingError(f"{len(leaves)} parameters but {len(specs)} logical specs: the trees differ")
    for (path, spec), leaf in zip(specs, leaves, strict=True):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        check_spec(np.shape(leaf), tuple(spec), mesh, rules, what=f"parameter {name}")
    for spec in ACTIVATION_SPECS:
        check_spec((0,) * len(spec), spec, mesh, rules, what=f"activation {spec}")


def validate_config(config: LingConfig, mesh: Mesh | jax.sharding.AbstractMesh, rules: Rules = LOGICAL_RULES,
                    batch_size: int | None = None) -> None:
    """Checks the model's dimensions (and the global batch) against the mesh, naming the config field.

    Raises:
      ShardingError: e.g. "num_experts (64), logical axis 'expert', is not
        divisible by mesh axis 'expert' (size 12)".
    """
    dims: list[tuple[str, str, int]] = [
        ("hidden_size", "embed", config.hidden_size),
        ("vocab_size", "vocab", config.vocab_size),
        ("num_attention_heads", "q_heads", config.num_attention_heads),
        ("num_key_value_heads", "kv_heads", config.num_key_value_heads),
    ]
    if config.num_dense_layers:
        dims.append(("intermediate_size", "mlp", config.intermediate_size))
    if config.num_moe_layers:
        dims += [("num_experts", "expert", config.num_experts),
                 ("moe_intermediate_size", "expert_mlp", config.moe_intermediate_size),
                 ("hidden_size", "expert_embed", config.hidden_size)]
        if config.num_shared_experts:
            dims.append(("moe_intermediate_size * num_shared_experts", "mlp", config.shared_intermediate_size))
    if batch_size is not None:
        dims.append(("batch_size", "activation_batch", batch_size))
    for field, logical, n in dims:
        check_spec((n,), (logical,), mesh, rules, what="config", fields=(field,))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s carrying the shardings that a restore should produce."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
