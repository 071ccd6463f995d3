"""Language-modelling and mixture-of-experts auxiliary losses (pure jnp, float32).

Axis letters as in `ling_jax.model` (B batch, T time, V vocab, E experts,
L layers).

* `cross_entropy` / `next_token_loss`: token cross-entropy with label -100
  ignored, as in PyTorch / Hugging Face.
* `z_loss`: the PaLM output z-loss, mean over real tokens of logsumexp(logits)^2.
* `load_balance_loss`: the Switch-Transformer balance loss from the router
  statistics the MoE layers sow (`ling_jax.model.moe`), averaged over layers.
* `router_stats`: those statistics pulled out of the `intermediates`
  collection of `model.apply(..., mutable=["intermediates"])`.
* `mtp_losses`: the cross-entropy of each Ling 2.0 multi-token-prediction layer.
* `causal_lm_loss` / `causal_lm_loss_parts`: the Hugging Face reference's
  training-mode `loss` for `labels` (both Ling generations).

Loss weights are the caller's (`ling_jax.train.step.LossConfig`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ling_jax.config import IGNORE_INDEX, MOE_MODULE, MOE_STACK
from ling_jax.model.mtp import roll_left

# Names the MoE layer sows into `intermediates` (see `ling_jax.model.moe.MoE._sow_stats`).
ROUTER_STAT_NAMES: tuple[str, ...] = ("tokens_per_expert", "router_prob_mean", "router_z_loss")


def cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
                  ) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy and the number of counted tokens.

    Args:
      logits: [B, T, V] float32.
      labels: [B, T] int; `ignore_index` entries are skipped.

    Returns:
      (sum of -log p(label), count of non-ignored labels), both float32 scalars.
    """
    valid = labels != ignore_index
    safe = jnp.where(valid, labels, 0)
    logits = logits.astype(jnp.float32)
    # log-sum-exp minus the label's logit: no [B, T, V] log-probabilities are materialised, and the backward
    # pass is one softmax-minus-one-hot over the logits.
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # [B, T]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked  # [B, T]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def next_token_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
                    ) -> jax.Array:
    """Mean next-token cross-entropy: position t predicts `labels[:, t + 1]`.

    This is the Hugging Face causal-LM loss (labels are the inputs, shifted here).
    """
    total, count = cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index)
    return total / jnp.maximum(count, 1.0)


def z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """The PaLM output z-loss: mean over real tokens of logsumexp(logits)^2.

    It pulls the softmax normaliser log Z towards 0, which keeps the logits
    from drifting; the caller applies the weight (PaLM used 1e-4).

    Args:
      logits: [B, T, V] (computed in float32 whatever the input dtype).
      mask: [B, T] bool or 0/1, true for the tokens that count (e.g.
        `labels != -100`); None counts every position.

    Returns:
      A float32 scalar (0 when no token counts).
    """
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [B, T]
    m = jnp.ones(lse.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(lse * lse * m) / jnp.maximum(jnp.sum(m), 1.0)


def load_balance_loss(tokens_per_expert: jax.Array, router_prob_mean: jax.Array, num_experts: int,
                      top_k: int) -> jax.Array:
    """Switch-Transformer load-balance loss, averaged over MoE layers.

    Per layer: E * sum_e f_e * P_e, where f_e = tokens_per_expert[e] / sum_e'
    tokens_per_expert[e'] is the fraction of routed (token, slot) pairs that
    went to expert e (the sum is tokens * top_k) and P_e is the mean router
    probability of expert e over the same tokens. Perfectly uniform routing
    (f_e = P_e = 1/E) gives 1.0. The counts carry no gradient
    (top-k selection is not differentiable): it flows through P_e, as in Switch.

    Args:
      tokens_per_expert: [E] or [L, E] routed-token counts (real tokens only).
      router_prob_mean: same shape, mean softmax router probability per expert.
      num_experts: E (checked against the last axis).
      top_k: experts per token (checked to lie in [1, E]; the normaliser is the
        measured sum, which is tokens * top_k).

    Returns:
      A float32 scalar: the mean over layers (all leading axes).

    Raises:
      ValueError: mismatched shapes, last axis != num_experts, or top_k outside [1, E].
    """
    if tokens_per_expert.shape != router_prob_mean.shape:
        raise ValueError(f"tokens_per_expert {tokens_per_expert.shape} and router_prob_mean "
                         f"{router_prob_mean.shape} must have the same shape")
    if not tokens_per_expert.shape or tokens_per_expert.shape[-1] != num_experts:
        raise ValueError(f"expected [..., {num_experts}] router statistics, got {tokens_per_expert.shape}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must lie in [1, {num_experts}], got {top_k}")
    counts = jax.lax.stop_gradient(tokens_per_expert.astype(jnp.float32))
    f = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)  # [..., E]
    per_layer = num_experts * jnp.sum(f * router_prob_mean.astype(jnp.float32), axis=-1)
    return jnp.mean(per_layer)


def expert_load(tokens_per_expert: jax.Array) -> jax.Array:
    """Fraction of routed tokens per expert, [..., E] summing to 1 over E (0 where nothing was routed)."""
    counts = tokens_per_expert.astype(jnp.float32)
    return counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)


def _unwrap(value: Any) -> jax.Array:
    """A sown value: `sow` stores a tuple of the values sown (one per call)."""
    if isinstance(value, tuple | list):
        if len(value) != 1:
            raise ValueError(f"expected one sown value per router statistic, got {len(value)}; "
                             "apply the model once per intermediates collection")
        return value[0]
    return value


def router_stats(intermediates: Mapping[str, Any], stack: tuple[str, ...] = (MOE_STACK,)) -> dict[str, jax.Array]:
    """The stacked MoE router statistics of one forward pass.

    Args:
      intermediates: the `intermediates` collection of
        `model.apply(..., mutable=["intermediates"])` (the whole mutable state,
        with an `intermediates` key, is accepted too).
      stack: the path of the MoE layers' stack (`(MTP_STACK, "layer")` for the MTP layers).

    Returns:
      `tokens_per_expert` [L, E] (float32 counts over real tokens),
      `router_prob_mean` [L, E] and `router_z_loss` [L], L the number of MoE
      layers; {} when the model has no MoE layers (or nothing was sown).

    Raises:
      ValueError: a partial set of statistics, or more than one sown value each.
    """
    if "intermediates" in intermediates:
        intermediates = intermediates["intermediates"]
    sown = intermediates
    for key in (*stack, MOE_MODULE):
        sown = sown.get(key, {})
    present = [name for name in ROUTER_STAT_NAMES if name in sown]
    if not present:
        return {}
    if len(present) != len(ROUTER_STAT_NAMES):
        missing = sorted(set(ROUTER_STAT_NAMES) - set(present))
        raise ValueError(f"router statistics incomplete: missing {missing}")
    return {name: _unwrap(sown[name]) for name in ROUTER_STAT_NAMES}


def mtp_targets(targets: jax.Array, segment_ids: jax.Array, depth: int) -> jax.Array:
    """Targets [P, B, T] of the P MTP layers from next-token `targets` [B, T] (packed rows).

    `targets[:, t]` is token t + 1, so layer d (predicting token t + d + 1) at t
    has target `targets[:, t + d]`, ignored when t + d is past the row or in
    another segment.
    """
    out = []
    for d in range(1, depth + 1):
        same = roll_left(segment_ids, d, -1) == segment_ids
        out.append(jnp.where(same, roll_left(targets, d, IGNORE_INDEX), IGNORE_INDEX))
    return jnp.stack(out)


def mtp_losses(mtp_logits: jax.Array, labels: jax.Array, *, reference_flattening: bool = True) -> jax.Array:
    """The loss of each MTP layer [P]: layer d (1-based) at position t predicts `labels[:, t + d + 1]`.

    Args:
      mtp_logits: [P, B, T, V] float32 (`LingForCausalLM.mtp_logits`).
      labels: [B, T] (the inputs; -100 ignored).
      reference_flattening: as the reference, score the batch flattened to one
        row: the last position of row b is then also scored against token 1 of
        row b + 1 (d = 1). False scores every row on its own (training).

    Returns:
      [P] float32 mean cross-entropies.
    """
    out = []
    for d in range(mtp_logits.shape[0]):
        labels = roll_left(labels, 1, IGNORE_INDEX)  # the reference's roll_tensor(labels, -1, fill=-100)
        logits = mtp_logits[d]
        if reference_flattening:
            out.append(next_token_loss(logits.reshape(1, -1, logits.shape[-1]), labels.reshape(1, -1)))
        else:
            out.append(next_token_loss(logits, labels))
    return jnp.stack(out)


def causal_lm_loss_parts(model: Any, params: Any, input_ids: jax.Array, labels: jax.Array | None = None
                         ) -> dict[str, jax.Array]:
    """`loss`, `lm_loss` and `mtp_loss` (the sum over MTP layers) of `causal_lm_loss`."""
    labels = input_ids if labels is None else labels
    variables = {"params": params}
    cfg = model.config
    if not cfg.num_mtp_layers:
        lm = next_token_loss(model.apply(variables, input_ids, deterministic=False), labels)
        return {"loss": lm, "lm_loss": lm, "mtp_loss": jnp.zeros((), jnp.float32)}
    logits, mtp_logits = model.apply(variables, input_ids, deterministic=False, method="mtp_logits")
    lm = next_token_loss(logits, labels)
    mtp = jnp.sum(mtp_losses(mtp_logits, labels))
    return {"loss": lm + cfg.mtp_loss_scaling_factor * mtp, "lm_loss": lm, "mtp_loss": mtp}


def causal_lm_loss(model: Any, params: Any, input_ids: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    """What the Hugging Face reference returns as `loss` in training mode, for either Ling generation.

    The mean next-token cross-entropy (v1 NormHead with its norm as a constant),
    plus `mtp_loss_scaling_factor` x each MTP layer's loss where the model has
    MTP layers (`mtp_losses`, with the reference's batch flattening).

    Args:
      model: a `LingForCausalLM`.
      params: its parameters.
      input_ids: [B, T] token ids.
      labels: [B, T] targets (-100 ignored); default `input_ids`.

    Returns:
      A float32 scalar.
    """
    return causal_lm_loss_parts(model, params, input_ids, labels)["loss"]
