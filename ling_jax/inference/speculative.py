"""Self-speculative greedy decoding with the Ling 2.0 multi-token-prediction layer.

Axis letters as in `ling_jax.model`. The MTP layer (`ling_jax.model.mtp`)
at position t predicts token t + 2 from the main model's hidden state at t and
the embedding of token t + 1, so each step can check a drafted token for free:

1. the main model decodes two tokens per row, the last verified token `cur`
   and the draft `d` (one forward step, T = 2, through the KV cache): its argmax
   after `cur` is n1 and after `d` is n2;
2. the MTP layer runs on the same two positions with the next tokens [n1, n2]
   (its own KV cache), drafting the token after n1 and the token after n2;
3. if every row's draft was right (d == n1) the step emits n1 and n2 and
   drafts from the second position; otherwise it emits n1 only, drafts from
   the first position, and the cache slot of the wrong draft is overwritten by
   the next step (the cache index moves by the tokens kept).

Every emitted token is the main model's argmax given the tokens before it,
so the output is that of plain greedy decoding (`ling_jax.inference.decoding`);
only the number of main-model steps changes. A batch accepts a step's draft
only when all its unfinished rows do (the rows share one cache index).
"""

from __future__ import annotations

import enum
import functools
from typing import Any

import jax
import jax.numpy as jnp

from ling_jax.model.attention import ModelMode
from ling_jax.model.kv_cache import KVCache, init_cache
from ling_jax.model.transformer import LingForCausalLM, default_positions


class Speculative(enum.Enum):
    """Speculative decoding schemes of `ling_jax.generate(..., speculative=...)`."""

    MTP = "mtp"  # draft one token with the model's own MTP layer (Ling 2.0 with num_nextn_predict_layers >= 1)


def _greedy(logits: jax.Array) -> jax.Array:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _main(model: LingForCausalLM, params: Any, ids: jax.Array, kv_valid: jax.Array, positions: jax.Array,
          cache: KVCache, mode: ModelMode) -> tuple[jax.Array, jax.Array, KVCache]:
    """Main-model hidden states [B, T, D], greedy next tokens [B, T] and the cache."""
    h, cache, _ = model.apply({"params": params}, ids, kv_valid, positions, cache=cache, mode=mode,
                              method="forward_all")
    return h, _greedy(model.apply({"params": params}, h, method="project")), cache


def _draft(model: LingForCausalLM, params: Any, h: jax.Array, next_ids: jax.Array, kv_valid: jax.Array,
           positions: jax.Array, cache: KVCache, mode: ModelMode) -> tuple[jax.Array, KVCache]:
    """The first MTP layer's greedy drafts [B, T] (token t + 2 at t) and the cache (its MTP part written)."""
    _, cache, mtp_h = model.apply({"params": params}, next_ids, kv_valid, positions, cache=cache, mode=mode,
                                  mtp_next_ids=next_ids, main_hidden=h, method="forward_all")
    return _greedy(model.apply({"params": params}, mtp_h[0], method="project")), cache


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def generate_mtp(model: LingForCausalLM, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                 eos_id: jax.Array, pad_id: jax.Array, *, max_new_tokens: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy continuations of left-padded prompts, drafted by the MTP layer (module docstring).

    Args:
      model: a model with MTP layers.
      params: its parameters.
      input_ids: [B, T] int32 left-padded prompts; attention_mask: [B, T] (checked by the caller).
      eos_id: [E] stop a row at any of these tokens (-1: never); pad_id: filler after a row's eos.
      max_new_tokens: N.

    Returns:
      `[B, T + N]` int32 (prompt, new tokens, pad after eos), the number of verify steps that accepted
      their draft, and the number of verify steps (both int32 scalars).
    """
    B, T = input_ids.shape
    N = max_new_tokens
    S = T + N + 1  # one slot past the end for the last step's draft
    cache = init_cache(model.config, B, S, model.dtype, mtp=True)
    kv_valid = jnp.concatenate([attention_mask, jnp.ones((B, N + 1), attention_mask.dtype)], 1)
    positions = default_positions(attention_mask, None, (B, T))
    h, nxt, cache = _main(model, params, input_ids, kv_valid, positions, cache, ModelMode.PREFILL)
    first = nxt[:, -1]
    drafts, cache = _draft(model, params, h, jnp.concatenate([input_ids[:, 1:], first[:, None]], 1), kv_valid,
                           positions, cache, ModelMode.PREFILL)
    out = jnp.concatenate([input_ids, first[:, None], jnp.full((B, N), pad_id, jnp.int32)], 1)  # [B, T + N + 1]
    done = jnp.isin(first, eos_id)
    pos = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # position of `first` in each row

    def cond(carry):
        i, _, _, _, _, done, _, _, _ = carry
        return (i < N) & ~jnp.all(done)

    def body(carry):
        i, out, cache, cur, draft, done, pos, accepted, steps = carry
        index = cache.index  # the slot of `cur`
        ids = jnp.stack([cur, draft], 1)  # [B, 2]
        step_pos = pos[:, None] + jnp.arange(2)
        h, nxt, verified = _main(model, params, ids, kv_valid, step_pos, cache, ModelMode.DECODE)
        new_drafts, verified = _draft(model, params, h, nxt, kv_valid, step_pos, verified.replace(index=index),
                                      ModelMode.DECODE)
        t1 = jnp.where(done, pad_id, nxt[:, 0])
        done1 = done | jnp.isin(t1, eos_id)
        t2 = jnp.where(done1, pad_id, nxt[:, 1])
        accept = jnp.all(done | (draft == nxt[:, 0])) & (i + 1 < N)
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.stack([t1, jnp.where(accept, t2, pad_id)], 1), T + i, 1)
        kept = 1 + accept.astype(jnp.int32)
        cur = jnp.where(accept, nxt[:, 1], nxt[:, 0])
        draft = jnp.where(accept, new_drafts[:, 1], new_drafts[:, 0])
        done = jnp.where(accept, done1 | jnp.isin(t2, eos_id), done1)
        cache = verified.replace(index=index + kept)
        return i + kept, out, cache, cur, draft, done, pos + kept, accepted + accept.astype(jnp.int32), steps + 1

    carry = (jnp.int32(1), out, cache, first, drafts[:, -1], done, pos, jnp.int32(0), jnp.int32(0))
    _, out, _, _, _, _, _, accepted, steps = jax.lax.while_loop(cond, body, carry)
    return out[:, :T + N], accepted, steps
