"""Pure training and evaluation steps, and the one accumulate-and-apply helper every task's step uses.

Axis letters as in `ling_jax.model`; here also A gradient-accumulation
microbatches. A batch is a dict of [B, T] int32 arrays (see `ling_jax.data.pipeline`):
`inputs`, `targets` (next-token labels, `IGNORE_INDEX` where none),
`segment_ids` (0 = padding) and `positions`.

The loss is the mean next-token cross-entropy over the real target tokens of
the whole global batch (all microbatches and devices), plus optional z-loss and
Switch-style load-balance loss from the router statistics:
`total_loss = nll + z_loss_weight * z_loss + balance_loss_weight * balance_loss`.
With accumulation the cross-entropy and z-loss are exactly those of the whole
batch; the balance loss (not linear in the routing statistics) is each
microbatch's, weighted by its share of the target tokens.

Ling 2.0 models with MTP layers add `mtp_loss_scaling_factor` x the sum over
MTP layers of each layer's mean cross-entropy (`ling_jax.train.losses.mtp_targets`;
logged as `mtp_loss`). After the optimizer update, every MoE layer's
`expert_bias` takes the aux-loss-free balancing step of
`ling_jax.train.balancing` (`LossConfig.bias_update_rate`; 0 keeps it fixed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ling_jax.config import IGNORE_INDEX, MOE_STACK, MTP_STACK, ConfigError
from ling_jax.model.sharding import like_params, logical_shardings
from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train.balancing import apply_bias_update
from ling_jax.train.losses import (
    cross_entropy,
    expert_load,
    load_balance_loss,
    mtp_targets,
    router_stats,
    z_loss,
)

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")  # the [B, T] int32 arrays of a batch
# loss_fn(params, microbatch) -> (this microbatch's share of the step's loss, summable metrics).
LossFn = Callable[[Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the step counter, params (f32 master weights) and the optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static settings of the training loss.

    Attributes:
      z_loss_weight: weight of the output z-loss (0 disables).
      balance_loss_weight: weight of the MoE load-balance loss (0 disables).
      accumulation_steps: microbatches per step (the batch splits along B).
      bias_update_rate: aux-loss-free balancing step of each `expert_bias` (`ling_jax.train.balancing`;
        0 disables; needs a model with `moe_router_enable_expert_bias`).
    """

    z_loss_weight: float = 0.0
    balance_loss_weight: float = 0.0
    accumulation_steps: int = 1
    bias_update_rate: float = 0.0


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state at step 0."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def train_state_shardings(abstract: TrainState, param_specs: Any, mesh: Mesh) -> tuple[TrainState, Any]:
    """Shardings of the train state (Adam moments as their params, scalars replicated) and of the params."""
    param_sh = logical_shardings(param_specs, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = like_params(abstract.opt_state, abstract.params, param_sh, replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh), param_sh


def accumulate_and_apply(state: TrainState, batch: Batch, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                         accumulation_steps: int) -> tuple[TrainState, jax.Array, dict[str, jax.Array]]:
    """Sums gradients and metrics of `loss_fn` over A microbatches (a `lax.scan`), then applies one update.

    `loss_fn` returns each microbatch's share of the step's loss (normalised by the
    whole batch, not the microbatch), so the summed gradient is the gradient of the
    step's loss however the batch is split.

    Args:
      state: the current state.
      batch: arrays with the batch on axis 0; B must divide by `accumulation_steps`.
      loss_fn: `(params, microbatch) -> (loss share, metric sums)`.
      optimizer: the Optax transformation.
      accumulation_steps: A.

    Returns:
      The new state, the gradients' global norm and the summed metrics.
    """
    A = accumulation_steps
    micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)  # [A, B/A, ...]
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def accumulate(carry, mb):
        grads, sums = carry
        (_, metrics), g = grad_fn(state.params, mb)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, metrics)), None

    first = jax.tree.map(lambda x: x[0], micro)
    sums0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(state.params, first)[0][1]))
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, sums), _ = jax.lax.scan(accumulate, (zeros, sums0), micro)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, optax.tree.norm(grads), sums


def _forward(model: LingForCausalLM, params: Any, batch: Batch, deterministic: bool, mtp: bool = False
             ) -> tuple[jax.Array, jax.Array | None, dict[str, jax.Array], dict[str, jax.Array]]:
    """Float32 logits [B, T, V], MTP logits [P, B, T, V] (None unless `mtp`), and the router statistics
    of the main MoE layers and of the MTP layers."""
    args = (batch["inputs"], batch["segment_ids"] > 0, batch["positions"], batch["segment_ids"])
    if mtp:
        (logits, mtp_logits), state = model.apply({"params": params}, *args, deterministic=deterministic,
                                                  method="mtp_logits", mutable=["intermediates"])
    else:
        logits, state = model.apply({"params": params}, *args, deterministic=deterministic, mutable=["intermediates"])
        mtp_logits = None
    sown = state.get("intermediates", {})
    return logits, mtp_logits, router_stats(sown), router_stats(sown, (MTP_STACK, "layer"))


def _microbatch_loss(params: Any, batch: Batch, model: LingForCausalLM, cfg: LossConfig,
                     total_tokens: jax.Array, mtp_tokens: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """This microbatch's share of the global mean loss, and its metric sums."""
    logits, mtp_logits, stats, mtp_stats = _forward(model, params, batch, False, mtp_tokens is not None)
    nll_sum, count = cross_entropy(logits, batch["targets"])
    share = count / total_tokens
    loss = nll_sum / total_tokens
    aux = {"nll_sum": nll_sum, "tokens": count}
    if cfg.z_loss_weight:
        z = z_loss(logits, batch["targets"] != IGNORE_INDEX)
        loss += cfg.z_loss_weight * z * share
        aux["z_loss"] = z * share
    if stats:
        balance = load_balance_loss(stats["tokens_per_expert"], stats["router_prob_mean"],
                                    model.config.num_experts, model.config.num_experts_per_tok)
        if cfg.balance_loss_weight:
            loss += cfg.balance_loss_weight * balance * share
        aux["balance_loss"] = balance * share
        aux["tokens_per_expert"] = stats["tokens_per_expert"]  # [L, E]
    if mtp_logits is not None:  # each MTP layer's mean cross-entropy over the whole batch, summed over layers
        targets = mtp_targets(batch["targets"], batch["segment_ids"], mtp_logits.shape[0])  # [P, B, T]
        mtp = sum(cross_entropy(mtp_logits[d], targets[d])[0] / mtp_tokens[d] for d in range(mtp_logits.shape[0]))
        loss += model.config.mtp_loss_scaling_factor * mtp
        aux["mtp_loss"] = mtp
        if mtp_stats:
            aux["mtp_tokens_per_expert"] = mtp_stats["tokens_per_expert"]  # [P, E]
    aux["total_loss"] = loss
    return loss, aux


def train_step(state: TrainState, batch: Batch, *, model: LingForCausalLM,
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
      `grad_norm`, `tokens`, optional `z_loss` / `balance_loss` / `mtp_loss`, and
      `expert_load` [L, E] (fraction of routed tokens per expert).
    """
    if loss_cfg.bias_update_rate and not model.config.moe_router_enable_expert_bias:
        raise ConfigError(f"loss.bias_update_rate={loss_cfg.bias_update_rate} needs a model with an expert bias: "
                          "set model_overrides.moe_router_enable_expert_bias=True (Ling 2.0 models have it)")
    total_tokens = jnp.maximum(jnp.sum(batch["targets"] != IGNORE_INDEX).astype(jnp.float32), 1.0)
    mtp_tokens = None
    if model.config.num_mtp_layers:
        targets = mtp_targets(batch["targets"], batch["segment_ids"], model.config.num_mtp_layers)
        mtp_tokens = jnp.maximum(jnp.sum(targets != IGNORE_INDEX, axis=(1, 2)).astype(jnp.float32), 1.0)  # [P]

    def loss_fn(params: Any, mb: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        return _microbatch_loss(params, mb, model, loss_cfg, total_tokens, mtp_tokens)

    new_state, grad_norm, aux = accumulate_and_apply(state, batch, loss_fn, optimizer, loss_cfg.accumulation_steps)
    loads = {MOE_STACK: aux.get("tokens_per_expert"), MTP_STACK: aux.get("mtp_tokens_per_expert")}
    new_state = new_state.replace(params=apply_bias_update(
        state.params, new_state.params, {k: v for k, v in loads.items() if v is not None}, loss_cfg.bias_update_rate))
    metrics = {"loss": aux["nll_sum"] / total_tokens, "total_loss": aux["total_loss"], "grad_norm": grad_norm,
               "tokens": aux["tokens"]}
    metrics.update({k: aux[k] for k in ("z_loss", "balance_loss", "mtp_loss") if k in aux})
    if "tokens_per_expert" in aux:
        metrics["expert_load"] = expert_load(aux["tokens_per_expert"])
    return new_state, metrics


def eval_step(params: Any, batch: Batch, *, model: LingForCausalLM) -> dict[str, jax.Array]:
    """Summed held-out cross-entropy and token count of one batch (eval mode)."""
    logits, *_ = _forward(model, params, batch, deterministic=True)
    nll_sum, count = cross_entropy(logits, batch["targets"])
    return {"nll_sum": nll_sum, "tokens": count}
