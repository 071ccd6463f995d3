"""Language-modelling losses.

Axis letters as in `ling_jax.model`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100  # label value that contributes nothing, as in PyTorch / Hugging Face


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
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]  # [B, T]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def next_token_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
                    ) -> jax.Array:
    """Mean next-token cross-entropy: position t predicts `labels[:, t + 1]`.

    This is the Hugging Face causal-LM loss (labels are the inputs, shifted here).
    """
    total, count = cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index)
    return total / jnp.maximum(count, 1.0)
