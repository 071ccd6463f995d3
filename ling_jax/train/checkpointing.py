"""Training checkpoints: Orbax `CheckpointManager` over the train state, the data iterator and the model config.

Layout under `WORKDIR/checkpoints/<step>/`:
  * `state/`: the `TrainState` pytree (step, f32 params, optimizer state, RNG key data);
  * `data/`: the data iterator's state (JSON), so a resumed run reads the same batches;
  * `model_config/`: the model's `config.json` dict, checked on resume.

Saves are asynchronous; a checkpoint only becomes visible once complete, so a
run killed mid-save resumes from the previous one. Resume is exact: the same
params, optimizer state, step, RNG and next batch.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from ling_jax.config import LingConfig, UserError

_ITEMS = ("state", "data", "model_config")


class CheckpointMismatchError(UserError):
    """The work directory holds checkpoints of a different model."""


class TrainCheckpointer:
    """Saves and restores training runs in `directory` (keeps the last `keep`)."""

    def __init__(self, directory: str, *, keep: int, config: LingConfig):
        self.config = config
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self._mgr = ocp.CheckpointManager(os.path.abspath(directory), item_names=_ITEMS, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` and the data iterator state at `step`."""
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            model_config=ocp.args.JsonSave(self.config.to_hf_dict()),
        ), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `(state, data_state)` at `step` into the shardings of `abstract_state`.

        Raises:
          CheckpointMismatchError: the checkpoint's model differs from this run's.
        """
        saved = self._mgr.restore(step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore()))
        self._check_config(saved["model_config"], step)
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def _check_config(self, saved: dict[str, Any], step: int) -> None:
        ours = self.config.to_hf_dict()
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if diff:
            details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {ours.get(k)!r}" for k in diff[:8])
            raise CheckpointMismatchError(
                f"{self._mgr.directory} holds checkpoint {step} of a different model ({details}); "
                "use a new --workdir or the same model config")

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()
