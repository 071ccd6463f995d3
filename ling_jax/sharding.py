"""Device mesh and logical-axis rules.

The mesh has four named axes: `data` (pure data parallelism), `fsdp` (data
parallelism with parameters sharded over it), `expert` (experts spread over
devices) and `tensor` (heads and ffn features split). Every parameter and
activation carries logical axis names (see `ling_jax.layers`); `LOGICAL_RULES`
maps them to mesh axes and XLA's SPMD partitioner inserts the collectives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis name -> mesh axis (or axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("norm", None),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_embed", "fsdp"),
    ("expert_mlp", "tensor"),
    ("expert_router", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes `MESH_AXES` of the given sizes (missing axes are 1).

    A size of -1 (at most one) takes all remaining devices.

    Raises:
      ValueError: unknown axis names, or sizes whose product is not the device count.
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        rest = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = len(devices) // rest
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
                         f"but {len(devices)} are available; make the product of the axis sizes match")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_shardings(logical_specs: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """`NamedSharding`s for a pytree of logical `PartitionSpec`s."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of [B, T] input arrays: B over every data-parallel axis."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp", "expert")))
