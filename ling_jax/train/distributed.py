"""Multi-process start-up: `jax.distributed` for TPU pod slices, SLURM clusters and hand-launched processes.

A JAX job spanning several hosts runs the same program once per host (or once
per GPU); every process must call `jax.distributed.initialize` before its first
JAX computation so that the processes find each other, agree on the global
device list and can run collectives. `initialize()` decides from the
environment how the job was launched (`Launch`) and does that:

* `Launch.ENV`: `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` are set (any launcher, and the multi-process CPU test).
* `Launch.SLURM`: inside `srun` with more than one task; JAX reads
  `SLURM_STEP_NODELIST`, `SLURM_NTASKS`, `SLURM_PROCID` and `SLURM_LOCALID`
  itself (coordinator = first node of the step, one GPU per task).
* `Launch.TPU_POD`: on a Cloud TPU VM; JAX asks the TPU metadata server for
  the slice's workers (every host of the slice runs the same command).
* `Launch.SINGLE`: none of the above; nothing to initialize.

`LING_JAX_LAUNCH=<a Launch value>` overrides the detection (e.g. `single` on a
TPU VM that should not join a slice). On CPU the cross-process collectives are
gloo's (`jax_cpu_collectives_implementation`), selected before initializing.
"""

from __future__ import annotations

import dataclasses
import enum
import glob
import importlib.util
import os
from collections.abc import Mapping

import jax

from ling_jax.config import UserError

LAUNCH_ENV = "LING_JAX_LAUNCH"


class Launch(enum.Enum):
    """How the processes of a run were started."""

    SINGLE = "single"  # one process: no jax.distributed
    ENV = "env"  # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    SLURM = "slurm"  # srun with SLURM_NTASKS > 1 (JAX auto-detects the rest)
    TPU_POD = "tpu_pod"  # a Cloud TPU VM (JAX auto-detects the slice's hosts)


class LaunchError(UserError):
    """An inconsistent multi-process environment; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """What `initialize` found and did.

    Attributes:
      launch: how the run was launched.
      process_index: this process, in [0, process_count).
      process_count: processes in the job.
      local_devices: devices this process drives.
      global_devices: devices of the whole job.
    """

    launch: Launch
    process_index: int
    process_count: int
    local_devices: int
    global_devices: int


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM: libtpu is installed and TPU chips are attached."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def detect_launch(environ: Mapping[str, str] | None = None) -> Launch:
    """The `Launch` of this process, from its environment (`LING_JAX_LAUNCH` first).

    Raises:
      LaunchError: an unknown `LING_JAX_LAUNCH` value.
    """
    env = os.environ if environ is None else environ
    forced = env.get(LAUNCH_ENV, "").strip().lower()
    if forced:
        try:
            return Launch(forced)
        except ValueError:
            raise LaunchError(f"{LAUNCH_ENV}={forced!r}; expected one of {[m.value for m in Launch]}") from None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return Launch.ENV
    if "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return Launch.SLURM
    if _on_cloud_tpu_vm():
        return Launch.TPU_POD
    return Launch.SINGLE


def _env_int(env: Mapping[str, str], name: str, fallback: str | None = None) -> int:
    value = env.get(name, env.get(fallback) if fallback else None)
    if value is None:
        raise LaunchError(f"JAX_COORDINATOR_ADDRESS is set, so {name} must be too (an integer)")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def env_arguments(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """`jax.distributed.initialize` arguments of a `Launch.ENV` process.

    `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` may also be spelled `NUM_PROCESSES` / `PROCESS_ID`.

    Raises:
      LaunchError: a missing or malformed variable, or a process id out of range.
    """
    env = os.environ if environ is None else environ
    address = env.get("JAX_COORDINATOR_ADDRESS", "")
    if ":" not in address:
        raise LaunchError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port (the host of process 0)")
    count = _env_int(env, "JAX_NUM_PROCESSES", "NUM_PROCESSES")
    index = _env_int(env, "JAX_PROCESS_ID", "PROCESS_ID")
    if count < 1 or not 0 <= index < count:
        raise LaunchError(f"JAX_PROCESS_ID={index} must lie in [0, JAX_NUM_PROCESSES={count})")
    return dict(coordinator_address=address, num_processes=count, process_id=index)


def use_cpu_gloo() -> None:
    """Selects gloo for CPU collectives across processes unless a user chose an implementation (e.g. mpi)."""
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(environ: Mapping[str, str] | None = None, *, timeout_s: int = 300) -> ProcessInfo:
    """Joins the multi-process job this process belongs to (a no-op for a single process).

    Call it once, before any JAX computation. Calling it again, or after
    `jax.distributed.initialize` elsewhere, only reports.

    Args:
      environ: the environment to read (default `os.environ`).
      timeout_s: seconds to wait for every process to reach the coordinator.

    Returns:
      The launch kind and the process / device counts (the backend is initialized).

    Raises:
      LaunchError: an inconsistent environment (before JAX is touched).
    """
    launch = detect_launch(environ)
    if launch is not Launch.SINGLE and not jax.distributed.is_initialized():
        kwargs = env_arguments(environ) if launch is Launch.ENV else {}
        use_cpu_gloo()
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout_s)
    return ProcessInfo(launch=launch, process_index=jax.process_index(), process_count=jax.process_count(),
                       local_devices=jax.local_device_count(), global_devices=jax.device_count())


def barrier(name: str) -> None:
    """Waits until every process of the job reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
