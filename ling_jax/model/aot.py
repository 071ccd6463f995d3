"""Ahead-of-time compilation for devices this host does not have: TPU topologies, memory per device.

`jax.experimental.topologies.get_topology_desc` gives abstract TPU devices on a
CPU-only host once `libtpu` is installed (`pip install "jax[tpu]"`); a mesh of
those devices, set with `jax.set_mesh` (`ling_jax.model.sharding.use_mesh`),
makes every `AUTO` choice pick the TPU path (`pallas_kernels.common.target_platform`:
splash attention, the Mosaic grouped matmul, the ragged all-to-all), and
`jax.jit(f).lower(...).compile()` runs the real XLA:TPU and Mosaic compilers.
`MemoryUse` is what the compiler reports per device.

GPU: the CUDA plugin of the package registry needs a GPU to create its client,
so there is no ahead-of-time GPU compile on a CPU host; GPU programs are checked
on a machine with a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax

from ling_jax.config import UserError

GIB = 2**30
# Chips' HBM per device, by the device kind the topology reports (public figures).
HBM_GIB = {"TPU v4": 32.0, "TPU v5": 95.0, "TPU v5p": 95.0, "TPU v5 lite": 16.0, "TPU v5e": 16.0,
           "TPU v6 lite": 32.0, "TPU v6e": 32.0}


class TopologyError(UserError):
    """A topology name the TPU compiler does not accept, or no `libtpu` installed."""


def tpu_topology(name: str, num_slices: int = 1) -> list[jax.Device]:
    """The abstract devices of a TPU topology such as `v5p:2x2x2`, `v5e:4x4` or `v6e:2x2` (no TPU needed).

    Args:
      name: `<chip>:<shape>`, as `jax.experimental.topologies.get_topology_desc` takes it.
      num_slices: slices of that shape joined over the data-center network (multi-slice).

    Raises:
      TopologyError: `libtpu` is missing or the compiler rejects the name (its message is kept).
    """
    # libtpu on a host without TPUs: let it start beside other JAX processes and skip the metadata server.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(topology_name=name, platform="tpu", num_slices=num_slices)
    except (RuntimeError, ValueError, jax.errors.JaxRuntimeError) as e:
        raise TopologyError(f"TPU topology {name!r} (x{num_slices} slices) is not available: {e}. Install the TPU "
                            "compiler with pip install 'ling_jax[tpu]' and give a topology such as v5p:2x2x2, "
                            "v5e:4x4 or v6e:2x2") from None
    return list(topology.devices)


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """What the compiler reports per device for one compiled program, in bytes."""

    arguments: int
    outputs: int
    temporaries: int
    code: int
    aliased: int  # outputs that reuse donated argument buffers

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> MemoryUse:
        m = compiled.memory_analysis()
        return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
                   int(m.generated_code_size_in_bytes), int(m.alias_size_in_bytes))

    @property
    def peak(self) -> int:
        """Arguments, outputs not written in place, temporaries and code: what must fit in HBM."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def rows(self) -> list[tuple[str, int]]:
        return [("arguments", self.arguments), ("outputs", self.outputs), ("aliased (donated)", self.aliased),
                ("temporaries", self.temporaries), ("code", self.code), ("peak", self.peak)]


@dataclasses.dataclass(frozen=True)
class CompiledProgram:
    """One program compiled ahead of time: what it is, the compiler's memory per device, compile seconds."""

    name: str
    memory: MemoryUse
    seconds: float


def hbm_bytes(device: jax.Device) -> int | None:
    """The HBM of one device of `device`'s kind, when known."""
    gib = HBM_GIB.get(getattr(device, "device_kind", ""))
    return None if gib is None else int(gib * GIB)


def compile_abstract(fn: Callable[..., Any], *args: Any, **jit_kwargs: Any) -> jax.stages.Compiled:
    """`jax.jit(fn, **jit_kwargs).lower(*args).compile()` for abstract (`ShapeDtypeStruct`) arguments."""
    return jax.jit(fn, **jit_kwargs).lower(*args).compile()

