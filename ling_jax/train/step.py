"""Pure training and evaluation steps.

Axis letters as in `ling_jax.model`; here also A gradient-accumulation
microbatches. A batch is a dict of [B, T] int32 arrays (see `ling_jax.data`):
`inputs`, `targets` (next-token labels, -100 where none), `segment_ids`
(0 = padding) and `positions`.

The loss is the mean next-token cross-entropy over the real target tokens of
the whole global batch (all microbatches and devices), plus optional z-loss and
Switch-style load-balance loss from the router statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train.losses import cross_entropy, expert_load, load_balance_loss, router_stats, z_loss


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the step counter, params (f32 master weights), optimizer state, RNG."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so that checkpoints hold plain arrays


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static settings of the training loss.

    Attributes:
      z_loss_weight: weight of the output z-loss (0 disables).
      balance_loss_weight: weight of the MoE load-balance loss (0 disables).
      accumulation_steps: microbatches per step (the batch splits along B).
    """

    z_loss_weight: float = 0.0
    balance_loss_weight: float = 0.0
    accumulation_steps: int = 1


def init_train_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state at step 0."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def _forward(model: LingForCausalLM, params: Any, batch: dict[str, jax.Array], deterministic: bool):
    mask = batch["segment_ids"] > 0
    logits, state = model.apply({"params": params}, batch["inputs"], mask, batch["positions"],
                                batch["segment_ids"], deterministic=deterministic, mutable=["intermediates"])
    return logits, router_stats(state.get("intermediates", {})), mask


def _microbatch_loss(params, batch, model: LingForCausalLM, cfg: LossConfig, total_tokens: jax.Array):
    """This microbatch's share of the global mean loss, and its metrics."""
    logits, stats, _ = _forward(model, params, batch, deterministic=False)
    nll_sum, count = cross_entropy(logits, batch["targets"])
    share = count / total_tokens
    loss = nll_sum / total_tokens
    aux = {"nll_sum": nll_sum, "tokens": count}
    if cfg.z_loss_weight:
        z = z_loss(logits, batch["targets"] != -100)
        loss += cfg.z_loss_weight * z * share
        aux["z_loss"] = z * share
    if stats:
        E = model.config.num_experts
        balance = load_balance_loss(stats["tokens_per_expert"], stats["router_prob_mean"], E,
                                    model.config.num_experts_per_tok)
        if cfg.balance_loss_weight:
            loss += cfg.balance_loss_weight * balance * share
        aux["balance_loss"] = balance * share
        aux["tokens_per_expert"] = stats["tokens_per_expert"]  # [L, E]
    return loss, aux


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: LingForCausalLM,
               optimizer: optax.GradientTransformation, loss_cfg: LossConfig = LossConfig()
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over a global batch, accumulating gradients over microbatches.

    Args:
      state: the current `TrainState`.
      batch: [B, T] arrays; B must divide by `loss_cfg.accumulation_steps`.
      model: the model (its `dtype` is the compute dtype; params stay in their own dtype).
      optimizer: the Optax transformation (schedule inside).
      loss_cfg: loss weights and accumulation.

    Returns:
      The new state and float32 metrics: `loss` (cross-entropy), `total_loss`,
      `grad_norm`, `tokens`, optional `z_loss` / `balance_loss`, and
      `expert_load` [L, E] (fraction of routed tokens per expert).
    """
    A = loss_cfg.accumulation_steps
    micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)  # [A, B/A, T]
    total_tokens = jnp.maximum(jnp.sum(batch["targets"] != -100).astype(jnp.float32), 1.0)
    grad_fn = jax.value_and_grad(_microbatch_loss, has_aux=True)

    def accumulate(carry, mb):
        grads, loss, aux = carry
        (l, a), g = grad_fn(state.params, mb, model, loss_cfg, total_tokens)
        return (jax.tree.map(jnp.add, grads, g), loss + l, jax.tree.map(jnp.add, aux, a)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    first = jax.tree.map(lambda x: x[0], micro)
    aux0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(state.params, first, model, loss_cfg,
                                                                       total_tokens)[0][1]))
    (grads, total, aux), _ = jax.lax.scan(accumulate, (zeros, jnp.float32(0), aux0), micro)

    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": aux["nll_sum"] / total_tokens, "total_loss": total, "grad_norm": optax.tree.norm(grads),
               "tokens": aux["tokens"]}
    for key in ("z_loss", "balance_loss"):
        if key in aux:
            metrics[key] = aux[key]
    if "tokens_per_expert" in aux:
        metrics["expert_load"] = expert_load(aux["tokens_per_expert"])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0]))
    return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, model: LingForCausalLM) -> dict[str, jax.Array]:
    """Summed held-out cross-entropy and token count of one batch (eval mode)."""
    logits, _, _ = _forward(model, params, batch, deterministic=True)
    nll_sum, count = cross_entropy(logits, batch["targets"])
    return {"nll_sum": nll_sum, "tokens": count}
