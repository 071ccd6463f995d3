"""Autoregressive generation with a KV cache: prefill, then a jitted `lax.while_loop` of decode steps.

Axis letters as in `ling_jax.model`. Batches are left-padded: every row's
prompt ends at slot T - 1, so all rows write the cache at the same slot while
each row keeps its own positions (`cumsum(mask) - 1`).

Speed (see `benchmarks/bench_latency.py`). Everything from the prefill to
the last token is one jitted program: no host round trip and no recompile per
step. The cache is created inside it and carried through the decode loop and
the layer scans, so each step writes its keys and values in place
(`ling_jax.model.kv_cache.CacheSlot`). A decode step's MoE reads only the
experts the batch chose (`ling_jax.model.moe`). Prompts longer than
`prefill_chunk` tokens are prefilled in chunks of that many (the first as a
PREFILL, the rest as multi-token DECODE steps over the cache), so attention
scores are at most [chunk, S], not [T, T]. Attention reads only the filled
part of the cache (`ling_jax.model.attention.cached_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ling_jax.config import UserError
from ling_jax.inference.speculative import Speculative, generate_mtp
from ling_jax.model.attention import ModelMode
from ling_jax.model.kv_cache import KVCache, init_cache
from ling_jax.model.transformer import LingForCausalLM, default_positions


def left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The prompts as `[B, T]` ids and attention mask, left-padded to the longest with `pad`."""
    T = max(map(len, prompts))
    ids = np.full((len(prompts), T), pad, np.int32)  # [B, T]
    mask = np.zeros((len(prompts), T), np.int32)  # [B, T]
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    return ids, mask


class GenerationError(UserError):
    """A generation request the model cannot serve; the message names the argument, its value and the fix."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen (static under jit).

    Attributes:
      temperature: 0 means greedy (argmax).
      top_k: keep the k most likely tokens (None: all).
      top_p: keep the smallest set whose probability reaches p (None: all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 is greedy decoding), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1 (or unset to keep every token), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p}")


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k is not None:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Smallest logit kept: the first one at which the cumulative mass reaches top_p.
        cut = jnp.sum(cum < sampling.top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, cut, axis=-1)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode_step(model: LingForCausalLM, params: Any, cache: KVCache, token: jax.Array, kv_valid: jax.Array,
                positions: jax.Array) -> tuple[jax.Array, KVCache]:
    """One token per row through the model: float32 logits [B, V] of the next token and the updated cache.

    Args:
      model: the model.
      params: its parameters.
      cache: the KV cache; `token` is written at slot `cache.index`.
      token: [B] int32 token ids.
      kv_valid: [B, S] True for the cache slots that hold (or will hold) a real token.
      positions: [B] int32 position of `token` in its row.
    """
    logits, cache = model.apply({"params": params}, token[:, None], kv_valid, positions[:, None],
                                cache=cache, mode=ModelMode.DECODE)
    return logits[:, -1], cache


PREFILL_CHUNK = 512  # prompts longer than this are prefilled in chunks of this many tokens


def prefill(model: LingForCausalLM, params: Any, cache: KVCache, input_ids: jax.Array, kv_valid: jax.Array,
            positions: jax.Array, chunk: int = PREFILL_CHUNK) -> tuple[jax.Array, KVCache]:
    """The prompt [B, T] into an empty cache, `chunk` tokens at a time: float32 logits [B, T_last, V], cache."""
    T = input_ids.shape[1]
    logits = None
    for start in range(0, T, chunk):
        stop = min(start + chunk, T)
        mode = ModelMode.PREFILL if start == 0 else ModelMode.DECODE
        logits, cache = model.apply({"params": params}, input_ids[:, start:stop], kv_valid,
                                    positions[:, start:stop], cache=cache, mode=mode)
    return logits, cache


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "prefill_chunk"))
def _generate(model: LingForCausalLM, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
              rng: jax.Array, eos_id: jax.Array, pad_id: jax.Array, *, max_new_tokens: int,
              sampling: Sampling, prefill_chunk: int = PREFILL_CHUNK) -> jax.Array:
    B, T = input_ids.shape
    S = T + max_new_tokens
    cache = init_cache(model.config, B, S, model.dtype)
    kv_valid = jnp.concatenate([attention_mask, jnp.ones((B, max_new_tokens), attention_mask.dtype)], 1)
    positions = default_positions(attention_mask, None, (B, T))
    logits, cache = prefill(model, params, cache, input_ids, kv_valid, positions, prefill_chunk)
    next_pos = jnp.sum(attention_mask, axis=1).astype(jnp.int32)  # [B]
    out = jnp.concatenate([input_ids, jnp.full((B, max_new_tokens), pad_id, jnp.int32)], 1)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, cache, logits, done, rng, pos = carry
        rng, step_rng = jax.random.split(rng)
        token = jnp.where(done, pad_id, sample(logits, step_rng, sampling))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], T + i, axis=1)
        done = done | jnp.isin(token, eos_id)  # eos_id: [E], any of them ends a row
        step_logits, cache = decode_step(model, params, cache, token, kv_valid, pos)
        return i + 1, out, cache, step_logits, done, rng, pos + 1

    carry = (jnp.int32(0), out, cache, logits[:, -1], jnp.zeros((B,), bool), rng, next_pos)
    return jax.lax.while_loop(cond, body, carry)[1]


def _check_speculative(speculative: Speculative | str, mtp_layers: int, sampling: Sampling) -> None:
    """Raises `GenerationError` for a speculative request the model or the sampling cannot serve."""
    try:
        Speculative(speculative)
    except ValueError:
        raise GenerationError(f"speculative={speculative!r} is not a scheme; expected one of "
                              f"{', '.join(s.value for s in Speculative)}") from None
    if not mtp_layers:
        raise GenerationError("speculative='mtp' needs a model with MTP layers (num_nextn_predict_layers >= 1, "
                              "Ling 2.0); drop speculative for this model")
    if sampling != Sampling():
        raise GenerationError(f"speculative='mtp' is greedy decoding: got {sampling}; set temperature=0 and leave "
                              "top_k / top_p unset")


def _checked_mask(input_ids: jax.Array, attention_mask: jax.Array | None, max_new_tokens: int,
                  max_positions: int) -> jax.Array:
    """The [B, T] int32 prompt mask, after checking the request (see `generate`)."""
    if input_ids.ndim != 2:
        raise GenerationError(f"input_ids must be [batch, length], got shape {input_ids.shape}; "
                              "wrap a single prompt in a list")
    B, T = input_ids.shape
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if T + max_new_tokens > max_positions:
        raise GenerationError(f"prompt length {T} + max_new_tokens {max_new_tokens} exceeds the model's "
                              f"max_position_embeddings {max_positions}; shorten the prompt or lower max_new_tokens")
    mask = jnp.ones((B, T), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != (B, T):
        raise GenerationError(f"attention_mask shape {mask.shape} does not match input_ids {input_ids.shape}")
    if not isinstance(mask, jax.core.Tracer) and not bool(jnp.all(mask[:, -1] == 1)):
        raise GenerationError("prompts must be left-padded: attention_mask[:, -1] must be 1 for every row; "
                              "put the padding before the prompt")
    return mask


def generate(
    model: LingForCausalLM,
    params: Any,
    input_ids: jax.Array,
    *,
    max_new_tokens: int,
    attention_mask: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
    speculative: Speculative | str | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> jax.Array:
    """Generates continuations of left-padded prompts.

    Args:
      model: the model (its `dtype` is also the KV cache dtype).
      params: its parameters.
      input_ids: [B, T] int prompt ids, left-padded.
      max_new_tokens: number of tokens to add.
      attention_mask: [B, T] 1 for real tokens (default: all real). Padding must be on the left.
      temperature: 0 for greedy decoding, else sampling temperature.
      top_k: sample among the k most likely tokens.
      top_p: nucleus sampling mass.
      eos_token_id: stop a row at this token, or at any of a list of them (a checkpoint's
        `generation_config.json` may list several; default: the config's `eos_token_id`; -1 never stops).
      pad_token_id: filler after a row's eos (default: the config's `pad_token_id`, else 0).
      rng: PRNG key for sampling (default `jax.random.key(0)`).
      speculative: "mtp" drafts with the model's MTP layer and verifies in the same step
        (`ling_jax.inference.speculative`; greedy only, the same tokens as without it).
      prefill_chunk: prefill longer prompts in chunks of this many tokens.

    Returns:
      [B, T + max_new_tokens] int32: the prompt, then the new tokens, pad after eos.
      The loop stops early once every row has produced eos.

    Raises:
      GenerationError: bad shapes, sampling settings, or a request longer than the model's positions.
    """
    cfg = model.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = _checked_mask(input_ids, attention_mask, max_new_tokens, cfg.max_position_embeddings)
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = [-1] if eos is None else (np.ravel(eos).astype(np.int64).tolist() or [-1])
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id or 0)
    sampling = Sampling(temperature, top_k, top_p)
    rng = jax.random.key(0) if rng is None else rng
    if prefill_chunk < 1:
        raise GenerationError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    eos_ids = jnp.asarray(eos, jnp.int32)  # [E]: any of them ends a row
    if speculative is not None:
        _check_speculative(speculative, cfg.num_mtp_layers, sampling)
        return generate_mtp(model, params, input_ids, mask, eos_ids, jnp.int32(pad),
                            max_new_tokens=max_new_tokens)[0]
    return _generate(model, params, input_ids, mask, rng, eos_ids, jnp.int32(pad),
                     max_new_tokens=max_new_tokens, sampling=sampling, prefill_chunk=prefill_chunk)
