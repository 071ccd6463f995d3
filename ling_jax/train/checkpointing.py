"""Training checkpoints: Orbax `CheckpointManager` over the train state, the data iterator and the model config.

Layout under `WORKDIR/checkpoints/<step>/`:
  * `state/`: the `TrainState` pytree (step, f32 params, optimizer state, RNG key data);
  * `data/`: the data iterator's state (JSON), so a resumed run reads the same batches;
  * `model_config/`: the model's `config.json` dict, checked on resume.

Saves are asynchronous; a checkpoint only becomes visible once complete, so a
run killed mid-save resumes from the previous one. Resume is exact: the same
params, optimizer state, step, RNG and next batch.

Once a save has committed, the step gets a manifest of its files' sizes
(`ling_jax.io.integrity`). `restore_latest` checks it: a step whose files are
missing or truncated, or that fails to restore, is moved aside to
`WORKDIR/damaged_checkpoints/` (never deleted) and the next newest intact step
is used, with a message naming the damage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

from ling_jax.config import LingConfig, UserError
from ling_jax.io import integrity
from ling_jax.train import distributed

_ITEMS = ("state", "data", "model_config")


class CheckpointMismatchError(UserError):
    """The work directory holds checkpoints of a different model."""


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (the storage failed or is full)."""


class TrainCheckpointer:
    """Saves and restores training runs in `directory` (keeps the last `keep`)."""

    def __init__(self, directory: str, *, keep: int, config: LingConfig):
        self.config = config
        self.directory = os.path.abspath(directory)
        self.damaged_dir = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=True)
        self._mgr = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options)
        self._closed_at: int | None = None  # the latest step when the manager was released

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None (after `close`: the newest when it closed)."""
        return self._closed_at if self._mgr is None else self._mgr.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` and the data iterator state at `step`."""
        self.wait()  # the previous save is committed and has its manifest
        with self._writing():
            self._mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                model_config=ocp.args.JsonSave(self.config.to_hf_dict()),
            ), force=True)

    def reached_preemption(self, step: int) -> bool:
        """Whether the platform's preemption notice (multi-process JAX jobs) asks every process to stop at `step`."""
        return jax.process_count() > 1 and self._mgr.reached_preemption(step)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `(state, data_state)` at `step` into the shardings of `abstract_state`.

        Raises:
          CheckpointMismatchError: the checkpoint's model differs from this run's.
          DamagedCheckpointError: its manifest names missing or truncated files.
        """
        integrity.check(self._step_dir(step))
        saved = self._mgr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
        self._check_config(saved["model_config"], step)
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """`(step, state, data_state)` of the newest intact checkpoint, or None when there is none.

        A damaged step (missing or truncated files, or any failure to read it other than a model mismatch)
        is moved aside to `damaged_dir`, with a message, and the next newest is tried.
        """
        for step in sorted(self._mgr.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, abstract_state))
            except CheckpointMismatchError:
                raise
            except (UserError, OSError, ValueError, KeyError, TypeError) as e:  # damage found by Orbax/TensorStore
                self._move_aside(step, e)
        return None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _move_aside(self, step: int, why: Exception) -> None:
        target = os.path.join(self.damaged_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
            os.makedirs(self.damaged_dir, exist_ok=True)
            os.rename(self._step_dir(step), target)
        distributed.barrier(f"damaged_checkpoint_{step}")
        print(f"checkpoint step {step} is damaged ({str(why).splitlines()[0][:400]}); moved it to {target} "
              "and resuming from the newest intact one", flush=True)
        self._mgr.reload()

    def _write_manifests(self) -> None:
        """A manifest for each committed step that has none (process 0; all processes' files are written)."""
        if jax.process_index() != 0:
            return
        for step in self._mgr.all_steps():
            step_dir = self._step_dir(step)
            if os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, integrity.MANIFEST)):
                integrity.write_manifest(step_dir)

    def _check_config(self, saved: dict[str, Any], step: int) -> None:
        ours = self.config.to_hf_dict()
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {ours.get(k)!r}" for k in diff[:8])
            raise CheckpointMismatchError(
                f"{self._mgr.directory} holds checkpoint {step} of a different model ({details}); "
                "use a new --workdir or the same model config")

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete (and gives them their manifests).

        Raises:
          CheckpointWriteError: a save failed (a full disk, a storage error); committed steps are intact.
        """
        with self._writing():
            self._mgr.wait_until_finished()
            self._write_manifests()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Turns a failed write (a full disk, a storage error) into a `CheckpointWriteError`."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as e:
            # The failed write's asyncio tasks report the same error again when they are collected at exit, after
            # the run's own message; that message already says it, so asyncio's echo is silenced.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            raise CheckpointWriteError(
                f"writing a checkpoint in {self.directory} failed ({str(e).strip().splitlines()[0][:300]}); the "
                f"newest committed checkpoint is step {self._mgr.latest_step()}: make room or fix the storage, then "
                "run the same command to resume from it") from e

    def close(self) -> None:
        """Waits for pending saves and releases the manager (again: a no-op)."""
        if self._mgr is not None:
            self.wait()
            self._closed_at = self._mgr.latest_step()
            self._mgr.close()
            self._mgr = None



class Preemption:
    """When to stop early and save: on SIGTERM (one process) or the platform's preemption notice (multi-process).

    Spot and preemptible machines get SIGTERM some seconds before they go. With one process the
    handler only records it; the loop asks `should_stop(step)` after each step, saves, waits for the
    commit and returns. In a multi-process job JAX's preemption service receives the notice on every
    host and Orbax's `reached_preemption` makes all processes stop at the same step, so no handler of
    our own is installed there. Use as a context manager (the previous handler comes back on exit).
    """

    def __init__(self, checkpointer: TrainCheckpointer):
        self.checkpointer = checkpointer
        self.signalled: int | None = None
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        del frame
        self.signalled = signum

    def should_stop(self, step: int) -> bool:
        """Whether to save at `step` and stop."""
        return self.signalled is not None or self.checkpointer.reached_preemption(step)
