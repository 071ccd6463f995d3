"""Weight-only int8 quantization for inference: symmetric int8 per output channel (or per group).

Why not Google's `qwix`: qwix quantizes by intercepting the JAX ops a Flax
module calls on its weights (`dot_general`, `einsum`, `conv`), matched by
module path. Our expert weights never reach such an op as a parameter: the
grouped matmul (`ling_jax.model.grouped_matmul`, Pallas kernels or the XLA
loop) and the decode path (`ling_jax.model.experts.sparse_routed_ffn`) slice
one expert's [D, F] out of the [E, D, F] stack first, and the embedding is a
row lookup. So qwix would leave most of a MoE model's bytes (the experts) in
float. Here the quantized weight is a value of the parameter tree instead:

* `QArray` holds int8 `values` and a float32 `scale` broadcastable against
  them (one scale per output channel: the contraction axes reduced with
  keepdims; with `group_size`, one per group of that many rows along the
  first contraction axis). It is a pytree, so it scans, slices (layer
  stacks), jits and saves like any array pair.
* The model's modules already cast every weight with `.astype(compute_dtype)`
  where they use it; `QArray.astype` dequantizes there, inside the jitted
  step, so weights stay int8 in memory between steps. Decode dequantizes only
  the experts it visits (`QArray.index`), the embedding only the rows it looks
  up (`QArray.take_rows`).
* Quantized: every linear weight (attention q/k/v/o, dense and shared MLPs,
  the routed experts, the router, lm_head) and the embedding table (per row).
  Norm scales and biases stay in float. A tied embedding stays float (it is
  both a lookup and the output projection).

`quantize_params(params, "int8")` converts a float tree (e.g. after
`from_pretrained`); `from_pretrained(..., quantize="int8")` does it at load.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from ling_jax.config import UserError


class QuantizeError(UserError):
    """An unknown quantization scheme or a group size that does not divide a weight."""


class Quantization(enum.Enum):
    """Weight quantization schemes."""

    INT8 = "int8"  # symmetric int8, one scale per output channel (or group)

    @classmethod
    def parse(cls, value: Any, field: str = "quantize") -> Quantization:
        """The scheme named by `value`; `QuantizeError` naming `field` and the choices otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise QuantizeError(f"{field}={value!r} is not a quantization scheme; choose one of "
                                f"{[q.value for q in cls]} (or leave it unset for float weights)") from None


@flax.struct.dataclass
class QArray:
    """An int8 weight and its float32 scales: `values * scale` is the weight.

    `values` has the weight's shape (Flax checks it against the module's
    declaration). Per group, `scale` splits the first contraction axis K into
    [K / G, 1] at `group_axis` (counted from the end, so slicing leading
    layer or expert axes keeps it right); `values` is viewed the same way to
    dequantize.
    """

    values: jax.Array  # int8, the weight's shape
    scale: jax.Array  # float32, broadcastable against `values` (or its grouped view)
    group_axis: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return self.values.shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: int8 values and float32 scales."""
        return self.values.size * self.values.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize

    def astype(self, dtype: Any) -> jax.Array:
        """The dequantized weight in `dtype` (computed in float32, then cast)."""
        v = self.values.astype(jnp.float32)
        if self.group_axis is not None:  # view K as [K / G, G]
            i = v.ndim + 1 + self.group_axis  # K's position (the K / G axis of the grouped view)
            groups = self.scale.shape[i]
            v = v.reshape(*v.shape[:i], groups, v.shape[i] // groups, *v.shape[i + 1:])
        return (v * self.scale).reshape(self.shape).astype(dtype)

    def index(self, i: jax.Array) -> QArray:
        """Entry `i` of the leading axis (one expert of an [E, ...] stack), still quantized."""
        return QArray(jax.lax.dynamic_index_in_dim(self.values, i, keepdims=False),
                      jax.lax.dynamic_index_in_dim(self.scale, i, keepdims=False), self.group_axis)

    def take_rows(self, ids: jax.Array, dtype: Any) -> jax.Array:
        """Rows `ids` of a [V, D] table, dequantized: [..., D]."""
        rows = jnp.take(self.values, ids, axis=0).astype(jnp.float32) * jnp.take(self.scale, ids, axis=0)
        return rows.astype(dtype)


# The contraction axes of each weight, counted from the end (leading layer / expert axes are batch axes).
_CONTRACTION = {
    "q_proj": (-3,), "k_proj": (-3,), "v_proj": (-3,),  # [D, N, H]
    "o_proj": (-3, -2),  # [N, H, D]
    "gate_proj": (-2,), "up_proj": (-2,), "down_proj": (-2,),  # [D, F], [F, D], experts [E, D, F]
    "router": (-2,),  # [D, E]
    "kernel": (-2,),  # lm_head [D, V]
    "embedding": (-1,),  # [V, D]: a lookup, one scale per row
}


def quantize(w: jax.Array, axes: tuple[int, ...], group_size: int | None = None, name: str = "weight") -> QArray:
    """Symmetric int8 of `w`, one scale per slice over `axes` (or per `group_size` rows of the first of them)."""
    w = jnp.asarray(w, jnp.float32)
    shape, group_axis = w.shape, None
    if group_size is not None and len(axes) == 1 and axes != (-1,):  # o_proj and the embedding: per channel
        k = w.shape[axes[0]]
        if k % group_size:
            raise QuantizeError(f"quantize group_size={group_size} does not divide {name}'s contraction axis of "
                                f"{k}; choose a divisor of every weight's input size (e.g. 64, 128) or per-channel")
        i = w.ndim + axes[0]
        w = w.reshape(*w.shape[:i], k // group_size, group_size, *w.shape[i + 1:])
        group_axis = axes[0] - 1
        axes = tuple(a for a in axes if a != axes[0]) + (axes[0],)  # the G axis sits where K was
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8).reshape(shape)
    return QArray(values, scale.astype(jnp.float32), group_axis)


def quantize_params(params: Any, scheme: Quantization | str = Quantization.INT8, *, group_size: int | None = None,
                    tied_embeddings: bool = False) -> Any:
    """The parameter tree with every linear weight (and an untied embedding) as a `QArray` (module docstring).

    Args:
      params: a float parameter tree of `LingForCausalLM`.
      scheme: `Quantization` or its value ("int8").
      group_size: one scale per this many input rows instead of per output channel.
      tied_embeddings: the model ties embedding and output (the embedding then stays float).

    Raises:
      QuantizeError: an unknown scheme, or a group size that does not divide a weight's input axis.
    """
    Quantization.parse(scheme)

    def one(path: tuple[Any, ...], leaf: jax.Array) -> Any:
        name = str(getattr(path[-1], "key", path[-1]))
        axes = _CONTRACTION.get(name)
        if axes is None or (name == "embedding" and tied_embeddings) or leaf.ndim < len(axes) + 1:
            return leaf
        return quantize(leaf, axes, group_size, "/".join(str(getattr(p, "key", p)) for p in path))

    return jax.tree_util.tree_map_with_path(one, params)


def weight_bytes(params: Any) -> int:
    """Bytes the parameter arrays hold (int8 values and scales of `QArray`s included)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray))
    return sum(x.nbytes if isinstance(x, QArray) else math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in leaves)
