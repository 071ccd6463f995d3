"""Mapping between Hugging Face BailingMoe (v1 and v2) tensors and the ling_jax parameter tree.

Each Hugging Face tensor is described once by a `TensorSpec`: its name and
shape, the parameter(s) it fills (tree path plus the layer / expert index in
the stacked arrays) and the two transforms (`split`: HF -> ours, `merge`: ours
-> HF). Both directions and every check derive from that one table.

For streaming conversion (`ling_jax.io.convert`), `leaf_sources` inverts the
table: for every parameter leaf, the slices of it that each Hugging Face tensor
fills, so that one stacked leaf can be built (or written) without the others.

The two errors every module of `ling_jax.io` raises for bad checkpoints live
here, at the bottom of the package: `CheckpointError` (unreadable, or not
matching the config) and `CheckpointNotFoundError` (a path that holds no
checkpoint).

Layouts (Hugging Face -> ling_jax), axis letters as in `ling_jax.model`:
  * `query_key_value.weight` [(N + 2K) * H, D] -> `q_proj` [D, N, H], `k_proj`
    [D, K, H], `v_proj` [D, K, H] (rows: all query heads, then keys, then values).
  * `dense.weight` [D, N * H] -> `o_proj` [N, H, D].
  * Linear `[out, in]` weights -> kernels `[in, out]`; experts stacked to
    `[E, ...]`, layers of a stack to `[L, ...]`.
  * Ling 2.0: `attention.{query,key}_layernorm.weight` [H] -> `attention/{query,key}_norm/scale`;
    `mlp.gate.expert_bias` [E] -> `mlp/expert_bias`; the MTP layers `model.layers.{L + j}` ->
    `mtp_layers/{enorm, hnorm, eh_proj, layer/..., final_norm}` (`eh_proj.weight` [D, 2D] -> [2D, D]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ling_jax.config import DENSE_STACK, EXPERT_BIAS, MOE_STACK, MTP_STACK, LingConfig, UserError
from ling_jax.model.params import abstract_params

Path = tuple[str, ...]


class CheckpointError(UserError):
    """An unreadable checkpoint, or one that does not match the config (the message lists every offending tensor)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A path that is not (or does not hold) the checkpoint asked for; the message says what to point at."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor and the parameter slices it maps to."""

    hf_name: str
    hf_shape: tuple[int, ...]
    targets: tuple[tuple[Path, tuple[int, ...]], ...]  # (param path, index into the stack)
    split: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    merge: Callable[..., np.ndarray]


def _linear(name: str, out_dim: int, in_dim: int, path: Path, index: tuple[int, ...]) -> TensorSpec:
    """`[out, in]` torch Linear weight <-> `[in, out]` kernel."""
    return TensorSpec(name, (out_dim, in_dim), ((path, index),),
                      lambda w: (w.T,), lambda k: np.ascontiguousarray(k.T))


def _vector(name: str, dim: int, path: Path, index: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, (dim,), ((path, index),), lambda w: (w,), lambda w: w)


def _attention_specs(cfg: LingConfig, p: str, layer: Path, l: int) -> list[TensorSpec]:
    D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = layer + ("attention",)
    cuts = (N * H, (N + K) * H)

    def split_qkv(w):  # [(N + 2K) * H, D]
        q, k, v = np.split(w, cuts, axis=0)
        return q.T.reshape(D, N, H), k.T.reshape(D, K, H), v.T.reshape(D, K, H)

    def merge_qkv(q, k, v):
        return np.concatenate([q.reshape(D, -1).T, k.reshape(D, -1).T, v.reshape(D, -1).T], axis=0)

    specs = [
        TensorSpec(f"{p}.attention.query_key_value.weight", ((N + 2 * K) * H, D),
                   tuple((a + (n,), (l,)) for n in ("q_proj", "k_proj", "v_proj")),
                   split_qkv, merge_qkv),
        TensorSpec(f"{p}.attention.dense.weight", (D, N * H), ((a + ("o_proj",), (l,)),),
                   lambda w: (w.T.reshape(N, H, D),), lambda o: np.ascontiguousarray(o.reshape(N * H, D).T)),
    ]
    if cfg.use_qkv_bias:
        specs.append(TensorSpec(
            f"{p}.attention.query_key_value.bias", ((N + 2 * K) * H,),
            tuple((a + (n,), (l,)) for n in ("q_bias", "k_bias", "v_bias")),
            lambda b: (lambda q, k, v: (q.reshape(N, H), k.reshape(K, H), v.reshape(K, H)))(*np.split(b, cuts)),
            lambda q, k, v: np.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)])))
    if cfg.use_bias:
        specs.append(_vector(f"{p}.attention.dense.bias", D, a + ("o_bias",), (l,)))
    if cfg.use_qk_norm:
        specs += [_vector(f"{p}.attention.query_layernorm.weight", H, a + ("query_norm", "scale"), (l,)),
                  _vector(f"{p}.attention.key_layernorm.weight", H, a + ("key_norm", "scale"), (l,))]
    return specs


def _mlp_specs(prefix: str, path: Path, index: tuple[int, ...], D: int, F: int) -> list[TensorSpec]:
    return [
        _linear(f"{prefix}.gate_proj.weight", F, D, path + ("gate_proj",), index),
        _linear(f"{prefix}.up_proj.weight", F, D, path + ("up_proj",), index),
        _linear(f"{prefix}.down_proj.weight", D, F, path + ("down_proj",), index),
    ]


def _decoder_layer_specs(cfg: LingConfig, p: str, layer: Path, l: int, moe: bool) -> list[TensorSpec]:
    """The tensors of decoder layer `p` (`model.layers.i`), filling slice `l` of the stack at `layer`."""
    D = cfg.hidden_size
    specs = [_vector(f"{p}.input_layernorm.weight", D, layer + ("input_norm", "scale"), (l,))]
    specs += _attention_specs(cfg, p, layer, l)
    specs.append(_vector(f"{p}.post_attention_layernorm.weight", D, layer + ("post_attention_norm", "scale"), (l,)))
    mlp = layer + ("mlp",)
    if not moe:
        return specs + _mlp_specs(f"{p}.mlp", mlp, (l,), D, cfg.intermediate_size)
    specs.append(_linear(f"{p}.mlp.gate.weight", cfg.num_experts, D, mlp + ("router",), (l,)))
    if cfg.moe_router_enable_expert_bias:
        specs.append(_vector(f"{p}.mlp.gate.expert_bias", cfg.num_experts, mlp + (EXPERT_BIAS,), (l,)))
    for e in range(cfg.num_experts):
        specs += _mlp_specs(f"{p}.mlp.experts.{e}", mlp, (l, e), D, cfg.moe_intermediate_size)
    if cfg.num_shared_experts:
        specs += _mlp_specs(f"{p}.mlp.shared_experts", mlp + ("shared_experts",), (l,), D,
                            cfg.shared_intermediate_size)
    return specs


def _mtp_layer_specs(cfg: LingConfig, p: str, j: int) -> list[TensorSpec]:
    """The tensors of MTP layer j, stored as `model.layers.{num_hidden_layers + j}` (`ling_jax.model.mtp`)."""
    D = cfg.hidden_size
    m = (MTP_STACK,)
    return [_vector(f"{p}.enorm.weight", D, m + ("enorm", "scale"), (j,)),
            _vector(f"{p}.hnorm.weight", D, m + ("hnorm", "scale"), (j,)),
            _linear(f"{p}.eh_proj.weight", D, 2 * D, m + ("eh_proj",), (j,)),
            *_decoder_layer_specs(cfg, p, m + ("layer",), j, moe=True),
            _vector(f"{p}.final_layernorm.weight", D, m + ("final_norm", "scale"), (j,))]


def tensor_specs(cfg: LingConfig) -> list[TensorSpec]:
    """Every tensor of a Hugging Face checkpoint of this config, in checkpoint order."""
    D, V = cfg.hidden_size, cfg.vocab_size
    specs = [TensorSpec("model.word_embeddings.weight", (V, D), ((("embed", "embedding"), ()),),
                        lambda w: (w,), lambda w: w)]
    for i in range(cfg.num_hidden_layers):
        moe = i >= cfg.first_k_dense_replace
        stack, l = (MOE_STACK, i - cfg.first_k_dense_replace) if moe else (DENSE_STACK, i)
        specs += _decoder_layer_specs(cfg, f"model.layers.{i}", (stack,), l, moe)
    for j in range(cfg.num_mtp_layers):
        specs += _mtp_layer_specs(cfg, f"model.layers.{cfg.num_hidden_layers + j}", j)
    specs.append(_vector("model.norm.weight", D, ("norm", "scale"), ()))
    if not cfg.tie_word_embeddings:
        specs.append(_linear("lm_head.weight", V, D, ("lm_head", "kernel"), ()))
    return specs


@dataclasses.dataclass(frozen=True)
class LeafSource:
    """One slice of a parameter leaf: `leaf[index] = spec.split(hf_tensor)[part]`."""

    spec: TensorSpec
    part: int
    index: tuple[int, ...]


def leaf_sources(cfg: LingConfig) -> dict[Path, list[LeafSource]]:
    """Parameter path -> the slices that fill it, in checkpoint order (every leaf is covered)."""
    out: dict[Path, list[LeafSource]] = {}
    for spec in tensor_specs(cfg):
        for part, (path, index) in enumerate(spec.targets):
            out.setdefault(path, []).append(LeafSource(spec, part, index))
    return out


def slice_shape(shape: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """The shape of one `leaf[index]` slice with `len(index) == depth`, keeping the sliced axes as 1."""
    return (1,) * depth + tuple(shape[depth:])


def iter_leaf_slices(tensors: Mapping[str, np.ndarray], sources: list[LeafSource], dtype: Any,
                     on_tensor: Callable[[], None] | None = None
                     ) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Yields `(index, slice)` for one leaf, reading one Hugging Face tensor at a time.

    Args:
      tensors: Hugging Face name -> array (may be lazy, e.g. `SafetensorsCheckpoint`).
      sources: the leaf's entry of `leaf_sources`.
      dtype: dtype of the yielded slices.
      on_tensor: called after reading each tensor whose first part this leaf is,
        so that a progress bar over all leaves counts every tensor once.
    """
    for src in sources:
        part = src.spec.split(np.asarray(tensors[src.spec.hf_name]))[src.part]
        if on_tensor is not None and src.part == 0:
            on_tensor()
        yield src.index, np.ascontiguousarray(part, dtype=dtype)


def merge_tensor(spec: TensorSpec, read: Callable[[Path, tuple[int, ...]], np.ndarray],
                 dtype: Any = None) -> np.ndarray:
    """One Hugging Face tensor from its parameter slices; `read(path, index)` returns `leaf[index]`."""
    arr = np.ascontiguousarray(spec.merge(*(np.asarray(read(path, index)) for path, index in spec.targets)))
    return arr if dtype is None else arr.astype(dtype, copy=False)


def _get(tree: Mapping[str, Any], path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def check_tensors(shapes: Mapping[str, tuple[int, ...]], cfg: LingConfig) -> None:
    """Raises `CheckpointError` listing every missing, misshapen or unexpected tensor."""
    specs = tensor_specs(cfg)
    problems = []
    for s in specs:
        if s.hf_name not in shapes:
            problems.append(f"missing {s.hf_name} (expected shape {s.hf_shape})")
        elif tuple(shapes[s.hf_name]) != s.hf_shape:
            problems.append(f"{s.hf_name}: expected shape {s.hf_shape}, found {tuple(shapes[s.hf_name])}")
    expected = {s.hf_name for s in specs}
    problems += [f"unexpected tensor {n} (shape {tuple(shapes[n])})"
                 for n in sorted(set(shapes) - expected) if not n.endswith("rotary_emb.inv_freq")]
    if problems:
        raise CheckpointError(f"{len(problems)} tensor(s) do not match the config:\n  "
                              + "\n  ".join(problems))


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], config: LingConfig, *,
                       dtype: Any = None, progress: Callable[[list], Iterator] | None = None
                       ) -> dict[str, Any]:
    """Builds the ling_jax parameter tree (NumPy arrays) from Hugging Face tensors.

    Tensors are read one at a time (`tensors` may be a lazy mapping over
    safetensors files), so peak memory is the output plus one tensor.

    Args:
      tensors: Hugging Face name -> array (`[out, in]` layouts).
      config: the architecture.
      dtype: output dtype; default the checkpoint's.
      progress: optional wrapper over the list of tensor specs (e.g. `tqdm`).

    Raises:
      CheckpointError: listing every missing, misshapen or unexpected tensor.
    """
    shapes = getattr(tensors, "shapes", None)
    shapes = shapes() if callable(shapes) else {n: np.shape(t) for n, t in tensors.items()}
    check_tensors(shapes, config)
    specs = tensor_specs(config)
    abstract = abstract_params(config)
    out = jax.tree.map(lambda _: None, abstract)
    it = specs if progress is None else progress(specs)
    for spec in it:
        parts = spec.split(np.asarray(tensors[spec.hf_name]))
        for (path, index), part in zip(spec.targets, parts, strict=True):
            node = _get(out, path[:-1])
            if node[path[-1]] is None:
                node[path[-1]] = np.empty(_get(abstract, path).shape, dtype or part.dtype)
            node[path[-1]][index] = part
    return out


def to_hf_state_dict(params: Mapping[str, Any], config: LingConfig, *, dtype: Any = None
                     ) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (name -> NumPy array, `[out, in]` layouts) of `params`."""
    params = nn.unbox(params)
    read = lambda path, index: _get(params, path)[index]  # noqa: E731
    return {spec.hf_name: merge_tensor(spec, read, dtype) for spec in tensor_specs(config)}
