"""An eager PyTorch port of Hugging Face BailingMoe v1 (`modeling_bailing_moe.py`): the benchmarks' reference model.

The original modeling code ships with the Hugging Face Ling checkpoints
(`BailingMoeForCausalLM`, `model_type: bailing_moe`) and needs `transformers`;
this file keeps its structure and numerics with PyTorch alone, module for
module and name for name (its `state_dict` keys are the checkpoint's):

  * `BailingMoeRMSNorm`: normalise in float32, cast back, multiply by the weight;
  * `BailingMoeRotaryEmbedding`: cos/sin caches over `max_position_embeddings`,
    rotate-half over the whole head, indexed by `position_ids`;
  * `BailingMoeAttention`: one `query_key_value` Linear (all query heads, then
    keys, then values), GQA by `repeat_kv`, scores / sqrt(head_dim) plus the
    additive 4D mask, softmax in float32, `dense` output;
  * `BailingMoeMLP` (SwiGLU), `BailingMoeGate` (softmax router, top-k,
    `norm_topk_prob`) and `BailingMoeSparseMoeBlock`: in training every
    expert runs on its rows of the repeated tokens; in eval `moe_infer` sorts
    the token copies by expert, loops over the experts in Python, scatters the
    outputs back and sums them weighted; shared experts are one wide MLP;
  * the first `first_k_dense_replace` layers use a dense MLP;
  * `BailingMoeForCausalLM`: `norm_head` divides the lm_head weight by its L2
    norm over the vocab axis plus 1e-7 (a constant in training; in eval the
    normalised weight is computed once and reused, as the original overwrites
    it once); float32 logits; mean next-token cross-entropy (-100 ignored).

Masks are the original eager ones (`_prepare_4d_causal_attention_mask`: 0 or
the dtype's minimum), so left-padded batches behave the same. `KVCache` is
the `DynamicCache` role (post-RoPE keys and values concatenated per layer).
Dropouts are not modelled (the Ling configs have them at 0; a config with one
non-zero is refused). Building, generating and training with it:
`benchmarks/torch_reference.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class BailingMoeConfig:
    """The fields of a BailingMoe v1 `config.json` that the model reads (defaults as the original's)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    moe_intermediate_size: int | None = None
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    num_shared_experts: int | None = None
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    norm_head: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    use_qkv_bias: bool = False
    use_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BailingMoeConfig:
        """From a parsed `config.json` (unknown keys ignored).

        Raises:
          ValueError: not a `bailing_moe` (v1) config, or a non-zero dropout, or
            an unsupported activation or RoPE scaling.
        """
        if d.get("model_type", "bailing_moe") != "bailing_moe":
            raise ValueError(f"model_type {d.get('model_type')!r}: this is the BailingMoe v1 (bailing_moe) reference")
        dropouts = {k: d[k] for k in ("embedding_dropout", "attention_dropout", "output_dropout") if d.get(k)}
        if dropouts:
            raise ValueError(f"dropout is not modelled by the reference: {dropouts}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r}: the Ling models use silu")
        scaling = d.get("rope_scaling")
        if scaling is not None and scaling.get("type", scaling.get("rope_type")) != "linear":
            raise ValueError(f"rope_scaling {scaling}: only linear scaling is ported")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


class BailingMoeRMSNorm(nn.Module):
    """RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class BailingMoeRotaryEmbedding(nn.Module):
    """cos / sin tables `[max_position_embeddings, head_dim]` (grown on demand), linear scaling divides positions."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float, scaling_factor: float = 1.0):
        super().__init__()
        self.dim, self.base, self.scaling_factor = dim, base, scaling_factor
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._set_cos_sin_cache(max_position_embeddings)

    def _set_cos_sin_cache(self, seq_len: int) -> None:
        self.max_seq_len_cached = seq_len
        t = torch.arange(seq_len, dtype=torch.int64).type_as(self.inv_freq) / self.scaling_factor
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos().to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("sin_cached", emb.sin().to(torch.get_default_dtype()), persistent=False)

    def forward(self, x: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len)
        return self.cos_cached[:seq_len].to(x.dtype), self.sin_cached[:seq_len].to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input (NeoX layout)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on `[B, heads, T, head_dim]` queries and keys at `position_ids` `[B, T]`."""
    cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """`[B, KV, T, H]` -> `[B, KV * n_rep, T, H]` (each kv head repeated for its query group)."""
    b, kv, t, h = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    return hidden_states[:, :, None].expand(b, kv, n_rep, t, h).reshape(b, kv * n_rep, t, h)


class KVCache:
    """Per-layer post-RoPE keys and values `[B, KV, S, H]`, grown by concatenation (the `DynamicCache` role)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def length(self, layer_idx: int = 0) -> int:
        """Cached positions of a layer (0 before the prefill)."""
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends this step's keys and values to layer `layer_idx`'s and returns the whole layer's."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]


def prepare_4d_causal_attention_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int,
                                     dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The eager additive mask `[B, 1, q_len, past_len + q_len]`: 0 where allowed, the dtype's minimum elsewhere.

    Causal over absolute positions (query i is position `past_len + i`), and
    every key whose `attention_mask` entry is 0 masked (left padding).
    """
    kv_len = past_len + q_len
    lowest = torch.finfo(dtype).min
    causal = torch.full((q_len, kv_len), lowest, dtype=dtype, device=device).triu(past_len + 1)
    mask = causal[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        mask = mask.masked_fill(attention_mask[:, None, None, :kv_len] == 0, lowest)
    return mask


class BailingMoeMLP(nn.Module):
    """SwiGLU without biases: `down_proj(silu(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, config: BailingMoeConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class BailingMoeGate(nn.Module):
    """Softmax router over all experts in float32, top-k, renormalised when `norm_topk_prob` and k > 1."""

    def __init__(self, config: BailingMoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty((config.num_experts, config.hidden_size)))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[B, T, D]` -> (top-k expert ids `[B*T, k]`, their weights `[B*T, k]` float32, router logits)."""
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        logits = functional.linear(hidden_states, self.weight, None)
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        topk_weight, topk_idx = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx, topk_weight, logits


class BailingMoeSparseMoeBlock(nn.Module):
    """Routed experts (a Python loop over them) plus the shared experts."""

    def __init__(self, config: BailingMoeConfig):
        super().__init__()
        self.num_experts_per_tok = config.num_experts_per_tok
        self.experts = nn.ModuleList(
            [BailingMoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)])
        self.gate = BailingMoeGate(config)
        self.shared_experts = (BailingMoeMLP(config, config.moe_intermediate_size * config.num_shared_experts)
                               if config.num_shared_experts else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        identity = hidden_states
        bsz, seq_len, h = hidden_states.shape
        topk_idx, topk_weight, _ = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, h)
        flat_topk_idx = topk_idx.view(-1)
        if self.training:
            hidden_states = hidden_states.repeat_interleave(self.num_experts_per_tok, dim=0)
            y = torch.empty_like(hidden_states)
            for i, expert in enumerate(self.experts):
                y[flat_topk_idx == i] = expert(hidden_states[flat_topk_idx == i])
            y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
            y = y.to(hidden_states.dtype).view(bsz, seq_len, h)
        else:
            y = self.moe_infer(hidden_states, topk_idx, topk_weight).view(bsz, seq_len, h)
        if self.shared_experts is not None:
            y = y + self.shared_experts(identity)
        return y

    @torch.no_grad()
    def moe_infer(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Sorts the `[N*k]` token copies by expert, runs each expert on its rows, scatters back, weighted sum."""
        cnts = topk_ids.new_zeros((topk_ids.shape[0], len(self.experts)))
        cnts.scatter_(1, topk_ids, 1)
        tokens_per_expert = cnts.sum(dim=0).cpu().numpy()
        idxs = topk_ids.view(-1).argsort()
        sorted_tokens = x[idxs // topk_ids.shape[1]]
        outputs, start_idx = [], 0
        for i, num_tokens in enumerate(tokens_per_expert):
            if num_tokens == 0:
                continue
            end_idx = start_idx + int(num_tokens)
            outputs.append(self.experts[i](sorted_tokens[start_idx:end_idx]))
            start_idx = end_idx
        outs = torch.cat(outputs, dim=0) if outputs else sorted_tokens.new_empty(0)
        new_x = torch.empty_like(outs)
        new_x[idxs] = outs
        return (new_x.view(*topk_ids.shape, -1).type(topk_weight.dtype).mul_(topk_weight.unsqueeze(dim=-1))
                .sum(dim=1).type(new_x.dtype))


class BailingMoeAttention(nn.Module):
    """Eager GQA attention with the fused `query_key_value` projection and the `dense` output."""

    def __init__(self, config: BailingMoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.dim_per_head
        self.query_key_value = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads)
                                         * self.head_dim, bias=config.use_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)
        factor = float(config.rope_scaling["factor"]) if config.rope_scaling else 1.0
        self.rotary_emb = BailingMoeRotaryEmbedding(self.head_dim, config.max_position_embeddings,
                                                    config.rope_theta, factor)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.size()
        qkv = self.query_key_value(hidden_states)
        qkv = qkv.view(bsz, q_len, self.num_heads + 2 * self.num_key_value_heads, self.head_dim)
        query_states, key_states, value_states = qkv.split(
            [self.num_heads, self.num_key_value_heads, self.num_key_value_heads], dim=-2)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = value_states.transpose(1, 2)
        kv_seq_len = key_states.shape[-2] + (cache.length(self.layer_idx) if cache is not None else 0)
        cos, sin = self.rotary_emb(value_states, seq_len=kv_seq_len)
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        key_states = repeat_kv(key_states, self.num_key_value_groups)
        value_states = repeat_kv(value_states, self.num_key_value_groups)
        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
        attn_weights = attn_weights + attention_mask
        attn_weights = functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
        attn_output = torch.matmul(attn_weights, value_states)
        attn_output = attn_output.transpose(1, 2).contiguous().reshape(bsz, q_len, -1)
        return self.dense(attn_output)


class BailingMoeDecoderLayer(nn.Module):
    """Pre-norm block: attention, then a dense MLP (layers < `first_k_dense_replace`) or the MoE block."""

    def __init__(self, config: BailingMoeConfig, layer_idx: int):
        super().__init__()
        self.attention = BailingMoeAttention(config, layer_idx)
        moe = config.num_experts is not None and layer_idx >= config.first_k_dense_replace
        self.mlp = BailingMoeSparseMoeBlock(config) if moe else BailingMoeMLP(config, config.intermediate_size)
        self.input_layernorm = BailingMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = BailingMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.attention(self.input_layernorm(hidden_states), attention_mask, position_ids, cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class BailingMoeModel(nn.Module):
    """Embedding (`padding_idx` = the pad id), the decoder layers, the final RMSNorm."""

    def __init__(self, config: BailingMoeConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([BailingMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = BailingMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The final hidden states `[B, T, D]`; `cache` (if given) is extended in place."""
        batch, seq_len = input_ids.shape
        past_len = cache.length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq_len, device=input_ids.device)[None]
        hidden_states = self.word_embeddings(input_ids)
        mask = prepare_4d_causal_attention_mask(attention_mask, batch, seq_len, past_len, hidden_states.dtype,
                                                hidden_states.device)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, position_ids, cache)
        return self.norm(hidden_states)


@dataclasses.dataclass
class CausalLMOutput:
    """What `BailingMoeForCausalLM.forward` returns."""

    logits: torch.Tensor  # [B, T, V] float32
    last_hidden_state: torch.Tensor  # [B, T, D] after the final norm
    loss: torch.Tensor | None = None  # mean next-token cross-entropy when labels were given


class BailingMoeForCausalLM(nn.Module):
    """The causal LM: `model`, then `lm_head` with NormHead (module docstring), float32 logits, the loss."""

    def __init__(self, config: BailingMoeConfig):
        super().__init__()
        self.config = config
        self.model = BailingMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight
        self._eval_head: tuple[Any, torch.Tensor] | None = None

    def _head_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.lm_head.weight
        if not self.config.norm_head:
            return w
        if self.training:
            return w / (torch.norm(w, p=2, dim=0, keepdim=True) + 1e-7).detach()
        key = (w._version, w.data_ptr(), dtype)
        if self._eval_head is None or self._eval_head[0] != key:  # the original normalises once, in place
            with torch.no_grad():
                w32 = w.float()
                self._eval_head = key, (w32 / (torch.norm(w32, p=2, dim=0, keepdim=True) + 1e-7)).to(dtype)
        return self._eval_head[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                labels: torch.Tensor | None = None) -> CausalLMOutput:
        """Logits for every position; with `labels` `[B, T]`, the loss of predicting `labels[:, 1:]`."""
        hidden_states = self.model(input_ids, attention_mask, position_ids, cache)
        logits = functional.linear(hidden_states, self._head_weight(hidden_states.dtype)).float()
        loss = None
        if labels is not None:
            loss = functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits, hidden_states, loss)
