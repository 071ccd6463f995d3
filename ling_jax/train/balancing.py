"""Aux-loss-free load balancing (DeepSeek-V3): each MoE layer's `expert_bias` follows its experts' load.

Axis letters as in `ling_jax.model` (L layers of a stack, E experts). After
every optimizer step, outside the gradient, every MoE layer's bias moves by

    expert_bias += bias_update_rate * sign(mean load - expert load)

where an expert's load is the number of (token, slot) pairs routed to it in
that step (`tokens_per_expert`, summed over microbatches): experts above the
mean load are chosen less often, those below more often. The bias only enters
the choice of the experts, never their weights (`ling_jax.model.routing`).

The bias is a leaf of the parameter tree (`.../mlp/expert_bias` [L, E]; no
gradient flows into it), so checkpoints save and restore it and the exporters
write it as `model.layers.N.mlp.gate.expert_bias`. The optimizer never moves
it: `apply_bias_update` sets it from the pre-step value whatever the optimizer
did (AdamW's weight decay would otherwise shrink it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ling_jax.config import EXPERT_BIAS


def bias_delta(tokens_per_expert: jax.Array, rate: float) -> jax.Array:
    """`rate * sign(mean load - load)` [L, E] for routed-token counts [L, E] (float32)."""
    counts = tokens_per_expert.astype(jnp.float32)
    return rate * jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts)


def _key(entry: Any) -> str:
    return str(getattr(entry, "key", entry))


def apply_bias_update(old_params: Any, new_params: Any, loads: Mapping[str, jax.Array], rate: float) -> Any:
    """`new_params` with every `expert_bias` set to its `old_params` value plus the balancing step.

    Args:
      old_params: the parameters before the optimizer step.
      new_params: after it.
      loads: stack name (the first key of the bias's path, e.g. `moe_layers`) -> `tokens_per_expert`
        [L, E] of this step; a stack without an entry keeps its bias.
      rate: `bias_update_rate` (0 keeps every bias).

    Returns:
      The parameter tree to keep.
    """
    def pick(path, old, new):
        if _key(path[-1]) != EXPERT_BIAS:
            return new
        load = loads.get(_key(path[0]))
        if load is None or not rate:
            return old
        return (old.astype(jnp.float32) + bias_delta(load, rate)).astype(old.dtype)

    return jax.tree_util.tree_map_with_path(pick, old_params, new_params)


def idle_experts(expert_load: jax.Array) -> jax.Array:
    """Experts per layer whose load (fraction of routed tokens, [L, E]) is under 1 / (4E): [L] int32."""
    E = expert_load.shape[-1]
    return jnp.sum(expert_load < 1.0 / (4 * E), axis=-1).astype(jnp.int32)
