"""The MoE router: expert scores, the choice of the top-k experts and their combine weights.

Axis letters as in `ling_jax.model` (X tokens, E experts, G expert groups).
One function for both Ling generations; the variant is `ScoreFunction` plus
the group and bias options of `LingConfig`:

* BailingMoe v1: softmax over all experts in float32, top-k, weights
  renormalised to sum 1 when `norm_topk_prob` and k > 1.
* Ling 2.0 (DeepSeek-V3 style): sigmoid scores in float32; a per-expert
  `expert_bias` is added for the choice only; the experts are split into
  `n_group` groups, a group's score is the sum of its 2 best biased scores,
  the best `topk_group` groups are kept and the top-k experts are chosen among
  them; the weights are the unbiased scores of the chosen experts,
  renormalised when k > 1, times `routed_scaling_factor`.

The bias carries no gradient (`stop_gradient`): it is moved by aux-loss-free
balancing (`ling_jax.train.balancing`), not by the optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ling_jax.config import LingConfig, ScoreFunction


def expert_scores(logits: jax.Array, score_function: ScoreFunction) -> jax.Array:
    """Scores [X, E] float32 of router logits [X, E]."""
    logits = logits.astype(jnp.float32)
    if score_function is ScoreFunction.SIGMOID:
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


def group_limited_choice(choice: jax.Array, n_group: int, topk_group: int) -> jax.Array:
    """`choice` [X, E] with the experts outside each token's best `topk_group` groups set to -inf.

    A group's score is the sum of its 2 best entries (as the reference).
    """
    X, E = choice.shape
    grouped = choice.reshape(X, n_group, E // n_group)  # [X, G, E/G]
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [X, G]
    _, best = jax.lax.top_k(group_scores, topk_group)  # [X, kg]
    kept = jnp.any(jax.nn.one_hot(best, n_group, dtype=jnp.bool_), axis=1)  # [X, G]
    return jnp.where(jnp.repeat(kept, E // n_group, axis=1), choice, -jnp.inf)


def route(logits: jax.Array, k: int, normalize: bool = True, *,
          score_function: ScoreFunction = ScoreFunction.SOFTMAX, bias: jax.Array | None = None,
          n_group: int = 1, topk_group: int = 1, scaling: float = 1.0
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scores, top-k weights and expert ids (module docstring).

    Args:
      logits: [X, E] router logits.
      k: experts per token.
      normalize: renormalise the chosen weights to sum 1 (only when k > 1).
      score_function: softmax (v1) or sigmoid (Ling 2.0).
      bias: [E] expert bias added to the scores for the choice only (no gradient), or None.
      n_group, topk_group: group-limited choice (1, 1: plain top-k).
      scaling: `routed_scaling_factor`, multiplies the final weights.

    Returns:
      scores [X, E] float32, weights [X, k] float32, expert ids [X, k] int32.
    """
    scores = expert_scores(logits, score_function)
    choice = scores if bias is None else scores + jax.lax.stop_gradient(bias).astype(jnp.float32)
    if n_group > 1:
        choice = group_limited_choice(choice, n_group, topk_group)
    top, experts = jax.lax.top_k(choice, k)
    weights = top if choice is scores else jnp.take_along_axis(scores, experts, axis=-1)  # unbiased
    if normalize and k > 1:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    if scaling != 1.0:
        weights = weights * scaling
    return scores, weights, experts.astype(jnp.int32)


def route_for(config: LingConfig, logits: jax.Array, bias: jax.Array | None
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`route` with the options of `config` (the MoE layer's call)."""
    return route(logits, config.num_experts_per_tok, config.norm_topk_prob, score_function=config.score_function,
                 bias=bias, n_group=config.n_group, topk_group=config.topk_group,
                 scaling=config.routed_scaling_factor)
