"""The benchmarks' PyTorch reference: build it, generate with it, train it (`benchmarks/torch_reference_model.py`).

Builders: `from_pretrained` (a Hugging Face directory of one or sharded
safetensors), `from_config` (random weights, as the original `_init_weights`),
`from_ling` (the weights of a ling_jax model's params, so a benchmark's two
sides run the same weights). `generate` is the greedy / sampling loop of
Hugging Face `generate`: position ids from the attention mask, a prefill over
the whole prompt, then one token per step through the cache. `adamw` and
`train_step` are the reference training step of `benchmarks/bench_train.py`.
`tests/test_torch_reference.py` proves the port equal to the original on the
fixture goldens.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.torch_reference_model import BailingMoeConfig, BailingMoeForCausalLM, BailingMoeGate, KVCache


def _init_weights(model: BailingMoeForCausalLM, seed: int) -> None:
    """Random weights as the original `_init_weights` (for the benchmarks' shapes).

    Normal(0, initializer_range) Linear and embedding weights, zero biases and
    padding row, unit norms; the router is drawn from the same normal.
    """
    gen = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=gen)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
            if isinstance(module, BailingMoeGate):
                module.weight.normal_(0.0, std, generator=gen)


def from_config(config: Mapping[str, Any] | BailingMoeConfig, *, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> BailingMoeForCausalLM:
    """A model with random weights (the original initialisation) from a config dict or `BailingMoeConfig`."""
    cfg = config if isinstance(config, BailingMoeConfig) else BailingMoeConfig.from_dict(config)
    model = BailingMoeForCausalLM(cfg)
    _init_weights(model, seed)
    return model.to(dtype).eval()


def load_state_dict(model: BailingMoeForCausalLM, tensors: Mapping[str, Any],
                    dtype: torch.dtype = torch.float32) -> BailingMoeForCausalLM:
    """Copies Hugging Face tensors (torch or NumPy, any float dtype) into `model`, cast to `dtype`; strict.

    Raises:
      KeyError: a missing or unexpected tensor (names listed).
    """
    own = model.state_dict()
    given = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, value in given.items():
            # NumPy (bfloat16 included) via float32, exact for every float a checkpoint holds
            t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value, np.float32))
            own[name].copy_(t.to(own[name].dtype))
    return model.to(dtype)


def from_pretrained(directory: str | os.PathLike, dtype: torch.dtype = torch.float32) -> BailingMoeForCausalLM:
    """Loads a Hugging Face BailingMoe directory (`config.json`, one or sharded safetensors) in eval mode."""
    from ling_jax.io.safetensors import SafetensorsCheckpoint  # the project's reader: index, shards, checks

    directory = os.fspath(directory)
    with open(os.path.join(directory, "config.json")) as f:
        config = BailingMoeConfig.from_dict(json.load(f))
    return load_state_dict(BailingMoeForCausalLM(config), SafetensorsCheckpoint(directory), dtype).eval()


def from_ling(config: Any, params: Any, dtype: torch.dtype = torch.float32) -> BailingMoeForCausalLM:
    """The reference model with the architecture and weights of a ling_jax v1 model.

    Args:
      config: the model's `ling_jax.LingConfig` (`model.config`).
      params: its parameter pytree (JAX or NumPy arrays, boxed or not).
      dtype: the reference's parameter dtype.
    """
    from ling_jax.io.hf_names import to_hf_state_dict

    state = to_hf_state_dict(params, config, dtype=np.float32)
    model = BailingMoeForCausalLM(BailingMoeConfig.from_dict(config.to_hf_dict()))
    return load_state_dict(model, state, dtype).eval()


def _next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Argmax when `temperature == 0`, else a sample after the temperature, top-k and top-p warpers."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(1, order, remove), -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model: BailingMoeForCausalLM, input_ids: torch.Tensor, *, max_new_tokens: int,
             attention_mask: torch.Tensor | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
    """Hugging Face `generate` for left-padded prompts: `[B, T]` -> `[B, T + max_new_tokens]` (fewer if all stop).

    Each step's position ids are `cumsum(attention_mask) - 1` (1 on padding).
    With `use_cache`, the first step is the prefill over the prompt and every
    later step feeds the last token through the `KVCache`; without it every
    step recomputes the whole sequence. Rows that produced `eos_token_id` are
    filled with `pad_token_id` (default: the config's, else 0).
    """
    model.eval()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    cache = KVCache() if use_cache else None
    ids, done = input_ids, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        past = cache.length() if cache is not None else 0
        step_ids, position_ids = ids[:, past:], position_ids[:, past:]
        logits = model(step_ids, attention_mask, position_ids, cache).logits[:, -1, :]
        nxt = _next_tokens(logits, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done = done | (nxt == eos_token_id)
        ids = torch.cat([ids, nxt[:, None]], dim=-1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((ids.shape[0], 1))], dim=-1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids


def adamw(model: nn.Module, *, lr: float, b1: float, b2: float, eps: float, weight_decay: float
          ) -> torch.optim.AdamW:
    """`torch.optim.AdamW` with no decay on the RMSNorm weights and biases (ling_jax's `decay_mask`)."""
    no_decay = [p for n, p in model.named_parameters() if n.endswith("layernorm.weight") or n.endswith(".bias")
                or n == "model.norm.weight"]
    ids = {id(p) for p in no_decay}
    decay = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(b1, b2), eps=eps)


def train_step(model: BailingMoeForCausalLM, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               clip_norm: float | None = None) -> float:
    """One reference training step on `input_ids` `[B, T]` (also the labels): loss, backward, clip, AdamW."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    optimizer.step()
    return float(loss.detach())
