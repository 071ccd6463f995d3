"""Direct Preference Optimization (Rafailov et al. 2023): the sigmoid loss and a pure training step.

Semantics follow Hugging Face TRL's `DPOTrainer` (`loss_type="sigmoid"`):

* a response's log-probability is the sum over its tokens (assistant text and end-of-text) of
  `log p(token | everything before)`, padding and prompt excluded (`sequence_logps`);
* `logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)`;
* `loss = -(1 - eps) * log_sigmoid(beta * logits) - eps * log_sigmoid(-beta * logits)`, averaged over pairs
  (`eps` = `label_smoothing`, the conservative DPO of Mitchell 2023; 0 by default);
* `rewards/chosen = beta * (pi_chosen - ref_chosen)`, `rewards/rejected` likewise, `rewards/margin` their
  difference and `rewards/accuracy` the fraction of pairs with chosen reward > rejected reward.

The reference model is frozen: `dpo_step` takes its parameters as an argument and computes the reference
log-probabilities in the same step, under `stop_gradient` (the reference forward costs about a third of the
step; precomputing them would need a pass over the data per epoch and ties them to one data order). The
reference parameters are not part of the `TrainState`, so checkpoints hold only the policy; `train.py`
reloads the reference from `config.init_from` when resuming.

Chosen and rejected rows go through the model together (`[2B, T]`), per microbatch of
`LossConfig.accumulation_steps`. Batches come from `ling_jax.data.dpo`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ling_jax.config import IGNORE_INDEX
from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train.step import TrainState, accumulate_and_apply

SIDES = ("chosen", "rejected")
_KEYS = ("inputs", "targets", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Static settings of the DPO loss.

    Attributes:
      beta: Strength of the KL regularisation towards the reference (TRL default 0.1).
      label_smoothing: Assumed probability that a preference label is flipped (0: plain DPO).
      accumulation_steps: Microbatches per step (the pair batch splits along B).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    accumulation_steps: int = 1

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array, ref_rejected: jax.Array,
             *, beta: float, label_smoothing: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The per-pair sigmoid DPO loss and the implicit rewards.

    Args:
      policy_chosen: `[B]` summed log-probabilities of the chosen responses under the policy.
      policy_rejected: `[B]` the same for the rejected responses.
      ref_chosen: `[B]` chosen log-probabilities under the reference model.
      ref_rejected: `[B]` rejected log-probabilities under the reference model.
      beta: The DPO temperature.
      label_smoothing: Conservative-DPO label noise (0: plain DPO).

    Returns:
      `(losses, chosen_rewards, rejected_rewards)`, each `[B]` float32; the rewards carry no gradient.
    """
    pc, pr, rc, rr = (x.astype(jnp.float32) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    logits = (pc - pr) - (rc - rr)
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * logits)
              - label_smoothing * jax.nn.log_sigmoid(-beta * logits))
    chosen_rewards = jax.lax.stop_gradient(beta * (pc - rc))
    rejected_rewards = jax.lax.stop_gradient(beta * (pr - rr))
    return losses, chosen_rewards, rejected_rewards


def sequence_logps(model: LingForCausalLM, params: Any, rows: dict[str, jax.Array], *, deterministic: bool
                   ) -> jax.Array:
    """`[B]` summed log-probabilities of the target tokens of each row (`targets != -100`).

    Args:
      model: The model.
      params: Its parameters.
      rows: `[B, T]` `inputs`, `targets`, `segment_ids` (0 = padding), `positions`.
      deterministic: False in training (NormHead's norm then carries no gradient, as in pre-training).
    """
    mask = rows["segment_ids"] > 0
    logits = model.apply({"params": params}, rows["inputs"], mask, rows["positions"], rows["segment_ids"],
                         deterministic=deterministic)
    valid = rows["targets"] != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(logp, jnp.where(valid, rows["targets"], 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, token, 0.0), axis=-1)


def _both(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Chosen rows then rejected rows, `[2B, T]`."""
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0) for k in _KEYS}


def _pair_logps(model: LingForCausalLM, params: Any, batch: dict[str, jax.Array], deterministic: bool
                ) -> tuple[jax.Array, jax.Array]:
    logps = sequence_logps(model, params, _both(batch), deterministic=deterministic)
    B = batch["chosen_inputs"].shape[0]
    return logps[:B], logps[B:]


def _pair_metrics(losses, chosen_rewards, rejected_rewards, pc, pr) -> dict[str, jax.Array]:
    """Per-batch sums (divided by the pair count by the caller)."""
    return {"loss": jnp.sum(losses), "rewards/chosen": jnp.sum(chosen_rewards),
            "rewards/rejected": jnp.sum(rejected_rewards),
            "rewards/accuracy": jnp.sum((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "rewards/margin": jnp.sum(chosen_rewards - rejected_rewards),
            "logps/chosen": jnp.sum(jax.lax.stop_gradient(pc)), "logps/rejected": jnp.sum(jax.lax.stop_gradient(pr))}


def _microbatch(params, ref_params, batch, model: LingForCausalLM, cfg: DpoConfig, num_pairs: int):
    ref_c, ref_r = _pair_logps(model, ref_params, batch, deterministic=True)
    ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
    pc, pr = _pair_logps(model, params, batch, deterministic=False)
    losses, cr, rr = dpo_loss(pc, pr, ref_c, ref_r, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    sums = _pair_metrics(losses, cr, rr, pc, pr)
    return sums["loss"] / num_pairs, sums


def dpo_step(state: TrainState, ref_params: Any, batch: dict[str, jax.Array], *, model: LingForCausalLM,
             optimizer: optax.GradientTransformation, dpo_cfg: DpoConfig = DpoConfig(),
             ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step of the policy on a batch of pairs (module docstring).

    Args:
      state: The policy's `TrainState`.
      ref_params: The frozen reference parameters (same tree as `state.params`, any float dtype).
      batch: `[B, T]` `chosen_*` and `rejected_*` rows (`ling_jax.data.dpo`); B divides by the accumulation.
      model: The model (shared by policy and reference).
      optimizer: The Optax transformation.
      dpo_cfg: beta, label smoothing, accumulation.

    Returns:
      The new state and float32 metrics: `loss` (mean over pairs), `rewards/chosen`, `rewards/rejected`,
      `rewards/accuracy`, `rewards/margin`, `logps/chosen`, `logps/rejected` (means), `grad_norm`.
    """
    B = batch["chosen_inputs"].shape[0]

    def loss_fn(params: Any, mb: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        return _microbatch(params, ref_params, mb, model, dpo_cfg, B)

    new_state, grad_norm, sums = accumulate_and_apply(state, batch, loss_fn, optimizer, dpo_cfg.accumulation_steps)
    return new_state, {**{k: v / B for k, v in sums.items()}, "grad_norm": grad_norm}


def dpo_eval_step(params: Any, ref_params: Any, batch: dict[str, jax.Array], *, model: LingForCausalLM,
                  dpo_cfg: DpoConfig = DpoConfig()) -> dict[str, jax.Array]:
    """Sums over the pairs of one held-out batch (`loss`, `rewards/*`, `logps/*`) and the pair count `pairs`."""
    pc, pr = _pair_logps(model, params, batch, deterministic=True)
    rc, rr = _pair_logps(model, ref_params, batch, deterministic=True)
    losses, cr, rr_ = dpo_loss(pc, pr, rc, rr, beta=dpo_cfg.beta, label_smoothing=dpo_cfg.label_smoothing)
    return {**_pair_metrics(losses, cr, rr_, pc, pr), "pairs": jnp.float32(pc.shape[0])}
