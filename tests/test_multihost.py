"""Multi-process training: two `train.py` processes with 4 CPU devices each equal one process with 8.

The two processes find each other through `jax.distributed` (coordinator on a
free localhost port, gloo CPU collectives), each feeds its half of the global
batch, and the mesh (data=2, expert=4) puts the data axis across the two
processes. The data are chosen so that the global batch does not depend on the
process count: every process reads a contiguous shard of the documents, so
with 2-token synthetic documents, no shuffling and exactly one global batch of
documents, process p's rows are rows [p*B/2, (p+1)*B/2) of the single-process
batch at every step (the batch repeats; the parameters, hence the losses, do not).
Also: the launch detection and its errors.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ling_jax.train import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, SEQ = 4, 8, 32
# All-reduces across processes run in gloo's order, within one process in XLA's: the gradients differ in the
# last bits and Adam carries that into the next steps. Observed: <= 1 float32 ulp of the loss (~5e-7) after 4 steps.
LOSS_RTOL = 1e-5
TIMEOUT_S = 240
ARGS = [
    "--config", "configs/default.py",
    f"--config.steps={STEPS}", "--config.log_every=1", "--config.checkpoint_every=1000",
    f"--config.batch_size={BATCH}", f"--config.seq_len={SEQ}",
    "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.expert=4", "--config.mesh.tensor=1",
    f"--config.data.synthetic_num_docs={BATCH * SEQ // 2}", "--config.data.synthetic_max_len=2",
    "--config.data.shuffle=False", "--config.data.eval_fraction=0.0",
    "--config.peak_flops_per_device=1e11", "--config.schedule.warmup_steps=0", "--config.schedule.peak_value=0.01",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
    """This environment minus anything that would change the launch or the device count."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "JAX_", "TPU_")) and k != distributed.LAUNCH_ENV}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               PYTHONPATH=ROOT, **extra)
    return env


def _train(envs: list[dict[str, str]], workdir: str) -> dict[int, float]:
    """Runs one `train.py` per environment, together; the per-step losses that process 0 logged."""
    procs = [subprocess.Popen([sys.executable, "train.py", *ARGS, f"--workdir={workdir}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
    deadline, outputs = time.monotonic() + TIMEOUT_S, []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1.0)))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate() for p in procs]
        pytest.fail(f"train.py did not finish in {TIMEOUT_S} s:\n" + _report(procs, outputs))
    if any(p.returncode for p in procs):
        pytest.fail("train.py failed:\n" + _report(procs, outputs))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _report(procs, outputs) -> str:
    return "\n".join(f"--- process {i} (exit {p.returncode}) stderr:\n{err[-4000:]}\nstdout:\n{out[-1500:]}"
                     for i, (p, (out, err)) in enumerate(zip(procs, outputs, strict=True)))


@pytest.mark.slow  # 90 s: two real train.py processes and a third for the reference
def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    two = [_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                LING_JAX_LAUNCH=distributed.Launch.ENV.value) for i in range(2)]
    t0 = time.monotonic()
    multi = _train(two, str(tmp_path / "two"))
    t1 = time.monotonic()
    single = _train([_env(8, LING_JAX_LAUNCH=distributed.Launch.SINGLE.value)], str(tmp_path / "one"))
    print(f"two processes: {t1 - t0:.1f} s, one process: {time.monotonic() - t1:.1f} s")
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    a, b = np.array([multi[s] for s in sorted(multi)]), np.array([single[s] for s in sorted(single)])
    np.testing.assert_allclose(a, b, rtol=LOSS_RTOL)
    assert a[-1] < a[0] - 1.0, f"the loss should fall on a repeated batch: {a}"  # the runs did train
    assert str(STEPS) in os.listdir(tmp_path / "two" / "checkpoints")  # both processes took part in the save


@pytest.mark.parametrize("env, launch", [
    ({}, distributed.Launch.SINGLE),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476"}, distributed.Launch.ENV),
    ({"SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "32"}, distributed.Launch.SLURM),
    ({"SLURM_STEP_NODELIST": "gpu01", "SLURM_NTASKS": "1"}, distributed.Launch.SINGLE),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "LING_JAX_LAUNCH": "single"}, distributed.Launch.SINGLE),
    ({"LING_JAX_LAUNCH": "TPU_POD"}, distributed.Launch.TPU_POD),
])
def test_detect_launch(env, launch):
    assert distributed.detect_launch(env) is launch


def test_env_arguments():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "16", "JAX_PROCESS_ID": "3"}
    assert distributed.env_arguments(env) == dict(coordinator_address="10.0.0.2:8476", num_processes=16,
                                                  process_id=3)
    assert distributed.env_arguments({"JAX_COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2",
                                      "PROCESS_ID": "1"})["process_id"] == 1


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES must be too"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID must be too"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"must lie in \[0, "),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "is not an integer"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "host:port"),
])
def test_env_errors(env, message):
    with pytest.raises(distributed.LaunchError, match=message):
        distributed.env_arguments(env)


def test_unknown_launch_override():
    with pytest.raises(distributed.LaunchError, match="expected one of"):
        distributed.detect_launch({"LING_JAX_LAUNCH": "mpi"})
