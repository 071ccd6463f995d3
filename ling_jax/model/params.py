"""The parameter tree of a model without allocating it: shapes, logical axes, counts; and its initialisation.

One `jax.eval_shape` of `LingForCausalLM.init` answers every abstract
question (`abstract_params`, `logical_axes`, `count_params`); the converters
and the planner use these, nobody traces `init` on their own.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ling_jax.config import MOE_MODULE, MOE_STACK, MTP_STACK, LingConfig
from ling_jax.model.transformer import LingForCausalLM

ROUTED_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")  # the [E, ...] leaves of an MoE layer


def _boxed(model: LingForCausalLM) -> Any:
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    # The key is made inside the trace: eagerly, under a mesh of devices this host does not have
    # (an ahead-of-time TPU topology), it could not run.
    return jax.eval_shape(lambda ids: model.init(jax.random.key(0), ids), ids)["params"]


def init_params(model: LingForCausalLM, rng: jax.Array) -> dict[str, Any]:
    """Randomly initialised parameters as a plain pytree (logical-axis boxes removed)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.jit(model.init)(rng, ids)["params"])


def abstract_params(config: LingConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The parameter tree as `jax.ShapeDtypeStruct`s in `dtype` (no memory allocated)."""
    return nn.unbox(_boxed(LingForCausalLM(config, param_dtype=dtype)))


def logical_axes(model: LingForCausalLM) -> dict[str, Any]:
    """The logical axis names of every parameter, as a pytree of `PartitionSpec`s."""
    return nn.get_partition_spec(_boxed(model))


def is_routed_expert(path: tuple) -> bool:
    """Whether a leaf path (of `jax.tree_util` keys) is a routed expert's weight `[L, E, ...]`."""
    keys = [getattr(p, "key", None) for p in path]
    return keys[0] == MOE_STACK and keys[-2] == MOE_MODULE and keys[-1] in ROUTED_EXPERT_WEIGHTS


EMBEDDING_PARAMS = ("embed", "lm_head")  # top-level subtrees that count as embeddings


def count_params_detail(config: LingConfig) -> dict[str, int]:
    """Parameter counts from `jax.eval_shape` (no memory allocated).

    Returns:
      `total`, `active` (what one token touches: everything except the routed
      experts it is not sent to), the same without the embeddings and lm_head
      (`total_non_embedding`, `active_non_embedding`), and `mtp`, the Ling 2.0
      multi-token-prediction layers, which none of the others include (as the
      model cards count).
    """
    total = routed = embedding = mtp = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(config)):
        n = math.prod(leaf.shape)
        top = getattr(path[0], "key", None)
        if top == MTP_STACK:
            mtp += n
            continue
        total += n
        embedding += n if top in EMBEDDING_PARAMS else 0
        routed += n if is_routed_expert(path) else 0
    unused = routed * (config.num_experts - config.num_experts_per_tok) // max(config.num_experts, 1)
    return {"total": total, "active": total - unused, "total_non_embedding": total - embedding,
            "active_non_embedding": total - unused - embedding, "mtp": mtp}


def count_params(config: LingConfig) -> tuple[int, int]:
    """`(total, active)` of `count_params_detail`: embeddings and lm_head count, MTP layers do not."""
    d = count_params_detail(config)
    return d["total"], d["active"]
