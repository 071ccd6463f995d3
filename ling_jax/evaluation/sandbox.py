"""Runs untrusted programs, each in its own sandboxed subprocess, with a parallel pool of workers.

Every program gets:

* a fresh temporary working directory (removed afterwards) and a stripped environment
  (`PATH=/usr/bin:/bin`, `LANG=C.UTF-8`, nothing else; `python -I -B`: no user site, no
  `PYTHON*` variables, no bytecode files);
* resource limits (`Limits`): address space, CPU seconds, number of processes, file size;
* a new session, whose whole process group is killed (SIGKILL) at the wall-clock timeout;
* no network: a new network namespace where the kernel allows it, and in every case an audit
  hook that makes socket creation fail (`ling_jax/evaluation/launcher.py` lists all it refuses);
* stdout and stderr captured together up to `Limits.output_bytes`; a program that prints more is
  killed (kind `output`).

A program passes only when the launcher saw it run to its last line and reported so with the
run's nonce on a private pipe: a program that calls `exit(0)` early, kills its parent, or
prints a fake verdict does not pass. `FailureKind` names every other outcome.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import enum
import json
import os
import pathlib
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from ling_jax.config import UserError

LAUNCHER = pathlib.Path(__file__).with_name("launcher.py")
_READ = 65536


class SandboxError(UserError):
    """Sandbox settings that cannot work (a limit below what Python needs, no workers)."""


class FailureKind(enum.Enum):
    """Why a program did not pass."""

    ASSERTION = "assertion"  # an assert of the tests failed
    EXCEPTION = "exception"  # any other exception escaped the program
    SYNTAX = "syntax"  # the program does not compile
    TIMEOUT = "timeout"  # wall-clock timeout or CPU-time limit
    MEMORY = "memory"  # MemoryError (the address-space limit)
    KILLED = "killed"  # died from a signal, or ended with no verdict and a non-zero status
    EARLY_EXIT = "early_exit"  # exited (sys.exit, os._exit, ...) before its last line
    BLOCKED = "blocked"  # tried something the sandbox refuses (socket, process, file outside its dir, ...)
    OUTPUT = "output"  # printed more than `Limits.output_bytes`, or hit the file-size limit


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one program.

    Attributes:
      timeout_s: wall-clock seconds before the process group is killed.
      cpu_seconds: CPU-time limit (RLIMIT_CPU).
      memory_bytes: address-space limit (RLIMIT_AS).
      processes: process limit (RLIMIT_NPROC; the kernel does not apply it to root, where the
        audit hook's ban on creating processes still holds).
      file_bytes: largest file the program may write (RLIMIT_FSIZE).
      output_bytes: stdout + stderr kept; a program printing more is killed.
    """

    timeout_s: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 2 << 30
    processes: int = 64
    file_bytes: int = 16 << 20
    output_bytes: int = 64 << 10

    def __post_init__(self):
        if self.timeout_s <= 0 or self.cpu_seconds < 1:
            raise SandboxError(f"timeout_s ({self.timeout_s}) must be > 0 and cpu_seconds ({self.cpu_seconds}) "
                               ">= 1; raise --timeout")
        if self.memory_bytes < 256 << 20:
            raise SandboxError(f"memory_bytes {self.memory_bytes} is below the 256 MiB a Python process needs")


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """The outcome of one program.

    Attributes:
      passed: the program ran to its end (verdict with the run's nonce).
      kind: why it failed (None when it passed).
      message: a short explanation (the exception, the signal, ...).
      output: the start of its stdout + stderr (at most `Limits.output_bytes`).
      seconds: wall-clock time of the subprocess.
      network: "namespace" or "guard": how the network was cut off ("" when unknown).
    """

    passed: bool
    kind: FailureKind | None
    message: str
    output: str
    seconds: float
    network: str = ""


def _environment(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _collect(proc: subprocess.Popen, result_r: int, limits: Limits) -> tuple[bytes, bytes, str | None]:
    """Reads output (capped) and the verdict until the process ends; kills it on timeout or too much output."""
    out, verdict = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(result_r, selectors.EVENT_READ, "verdict")
    deadline = time.monotonic() + limits.timeout_s
    reason = None
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            reason = "timeout"
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            data = os.read(key.fd, _READ)
            if not data:
                sel.unregister(key.fileobj)
            elif key.data == "out":
                out += data
                if len(out) > limits.output_bytes:
                    reason = "output"
            elif len(verdict) < 8192:
                verdict += data
        if reason:
            break
    sel.close()
    if reason:
        _kill_group(proc)
    return bytes(out[: limits.output_bytes]), bytes(verdict), reason


def _judge(verdict: bytes, nonce: str, returncode: int, reason: str | None, limits: Limits) -> tuple:
    """(passed, kind, message, network) from what the launcher reported and how the process ended."""
    if reason == "timeout":
        return False, FailureKind.TIMEOUT, f"no result after {limits.timeout_s:g} s (wall clock)", ""
    if reason == "output":
        return False, FailureKind.OUTPUT, f"printed more than {limits.output_bytes} bytes", ""
    try:
        record = json.loads(verdict.decode()) if verdict else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if returncode < 0:
        sig = signal.Signals(-returncode)
        kind = {signal.SIGXCPU: FailureKind.TIMEOUT, signal.SIGXFSZ: FailureKind.OUTPUT}.get(sig, FailureKind.KILLED)
        return False, kind, f"killed by {sig.name}", ""
    if not isinstance(record, dict):
        kind = FailureKind.EARLY_EXIT if returncode == 0 else FailureKind.KILLED
        return False, kind, f"ended with status {returncode} and no verdict", ""
    network = str(record.get("network", ""))
    if record.get("status") == "passed":
        if record.get("nonce") == nonce:
            return True, None, "", network
        return False, FailureKind.KILLED, "verdict without the run's nonce", network
    try:
        kind = FailureKind(record.get("status"))
    except ValueError:
        kind = FailureKind.KILLED
    return False, kind, str(record.get("message", ""))[:500], network


def run_program(program: str, limits: Limits = Limits()) -> ExecResult:
    """Runs one Python program in the sandbox (see the module docstring).

    Args:
      program: the full source (solution and tests).
      limits: its resource limits.

    Returns:
      The `ExecResult`; never raises for anything the program does.
    """
    workdir = tempfile.mkdtemp(prefix="ling-eval-")
    nonce = secrets.token_hex(16)
    result_r, result_w = os.pipe()
    start = time.monotonic()
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        limits_dict = dataclasses.asdict(limits)
        config = json.dumps({"program": path, "nonce": nonce, "limits": limits_dict}) + "\n"
        proc = subprocess.Popen([sys.executable, "-I", "-B", str(LAUNCHER), str(result_w)], cwd=workdir,
                                env=_environment(workdir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, pass_fds=(result_w,), start_new_session=True)
        os.close(result_w)
        result_w = -1
        try:
            proc.stdin.write(config.encode())
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out, verdict, reason = _collect(proc, result_r, limits)
        proc.stdout.close()
        returncode = proc.wait()
        _kill_group(proc)  # anything the program left behind in its group
        passed, kind, message, network = _judge(verdict, nonce, returncode, reason, limits)
        return ExecResult(passed, kind, message, out.decode("utf-8", "replace"), time.monotonic() - start, network)
    finally:
        os.close(result_r)
        if result_w >= 0:
            os.close(result_w)
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(programs: Sequence[str], limits: Limits = Limits(), *, workers: int = 2,
                 progress: Callable[[int], None] | None = None) -> list[ExecResult]:
    """Runs programs in parallel, `workers` subprocesses at a time; results in the order of `programs`.

    Args:
      programs: the sources.
      limits: the limits of each.
      workers: how many run at once (>= 1).
      progress: called with 1 after each program finishes (e.g. a tqdm bar's `update`).

    Raises:
      SandboxError: `workers` < 1.
    """
    if workers < 1:
        raise SandboxError(f"workers must be >= 1, got {workers}; pass --workers 1 or more")
    results: list[ExecResult | None] = [None] * len(programs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(1)
    return results
