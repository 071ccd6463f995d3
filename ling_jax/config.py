"""The architecture config: one frozen dataclass that round-trips a Hugging Face `config.json`.

`LingConfig` holds every architecture field of a BailingMoe (v1, `bailing_moe`)
or Ling 2.0 (`bailing_moe_v2`) `config.json` plus a
few runtime choices that are not part of the checkpoint (attention and grouped
matmul implementations, rematerialisation). Keys of `config.json` that the
model does not use (`architectures`, `auto_map`, `torch_dtype`, dropouts, ...)
are kept verbatim so that `to_hf_dict(from_hf_dict(d)) == d`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

MODEL_TYPES = ("bailing_moe", "bailing_moe_v2")
V1, V2 = MODEL_TYPES
ARCHITECTURES = {V1: "BailingMoeForCausalLM", V2: "BailingMoeV2ForCausalLM"}

IGNORE_INDEX = -100  # Label of a position with no next-token target (as PyTorch / Hugging Face).
DENSE_STACK = "dense_layers"  # The scanned stack of dense-MLP decoder layers (layers < first_k_dense_replace).
MOE_STACK = "moe_layers"  # The scanned stack of MoE decoder layers.
MOE_MODULE = "mlp"  # The MLP (dense or MoE) module's name inside a decoder layer.
MTP_STACK = "mtp_layers"  # The scanned stack of multi-token-prediction layers (Ling 2.0, `ling_jax.model.mtp`).
EXPERT_BIAS = "expert_bias"  # The router's load-balancing bias [E] (a buffer: no gradient, moved by balancing).


class UserError(ValueError):
    """Bad input from the user (a config, a file, a flag): commands report it in one line, without a traceback.

    Every error that a user can cause and fix derives from it (`ConfigError`,
    `CheckpointError`, `ShardingError`, `TokenizerError`, ...); a plain
    `ValueError` is a bug and keeps its traceback.
    """


class ConfigError(UserError):
    """An invalid or incomplete config; the message names the key."""


class DType(enum.Enum):
    """A floating-point dtype by name: the one table of dtype names (`--dtype`, `config.compute_dtype`, ...)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"

    def __str__(self) -> str:
        return self.value

    @property
    def jnp(self) -> Any:
        """The JAX dtype (`jnp.float32`, `jnp.bfloat16`)."""
        return jnp.bfloat16 if self is DType.BFLOAT16 else jnp.float32

    @property
    def numpy(self) -> np.dtype:
        """The NumPy dtype (bfloat16 from `ml_dtypes`)."""
        return np.dtype(ml_dtypes.bfloat16) if self is DType.BFLOAT16 else np.dtype(np.float32)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.numpy.itemsize

    @classmethod
    def parse(cls, value: Any, field: str) -> DType:
        """`value` (a `DType` or its name) as a `DType`; `ConfigError` naming `field` otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(f"{field}={value!r} is not a dtype; expected one of "
                              f"{', '.join(d.value for d in cls)}") from None


class ScoreFunction(enum.Enum):
    """How router logits become expert scores (`score_function` of config.json; see `ling_jax.model.routing`)."""

    SOFTMAX = "softmax"  # BailingMoe v1: softmax over all experts.
    SIGMOID = "sigmoid"  # Ling 2.0: an independent sigmoid per expert.


class AttentionImpl(enum.Enum):
    """How attention is computed. `AUTO` picks per backend."""

    AUTO = "auto"  # XLA on CPU, cuDNN flash on GPU, Pallas splash on TPU.
    XLA = "xla"  # Plain einsum + masked softmax; memory grows with T^2.
    CUDNN = "cudnn"  # `jax.nn.dot_product_attention(implementation="cudnn")`.
    SPLASH = "splash"  # JAX's Pallas TPU splash attention.


class GmmImpl(enum.Enum):
    """Which grouped-matmul implementation the MoE layer uses (see `ling_jax.model.grouped_matmul`)."""

    AUTO = "auto"  # PALLAS on TPU and GPU, XLA on CPU.
    PALLAS = "pallas"  # The Pallas kernels of `pallas_kernels` (Mosaic on TPU, Triton on GPU).
    XLA = "xla"  # The fast XLA:CPU path (a scan over the experts, bucketed dense dots).
    RAGGED_DOT = "ragged_dot"  # `jax.lax.ragged_dot` (a dense product over all groups on CPU).
    REFERENCE = "reference"  # Per-row weight gather: exact, memory-hungry, for tests.


class Exchange(enum.Enum):
    """How routed rows travel between the devices of the `expert` mesh axis."""

    AUTO = "auto"  # RAGGED on TPU and GPU, PADDED on CPU.
    RAGGED = "ragged"  # `jax.lax.ragged_all_to_all`: only the real rows are sent.
    PADDED = "padded"  # `jax.lax.all_to_all` of worst-case blocks: exact everywhere.


class Remat(enum.Enum):
    """What each decoder layer saves for the backward pass."""

    NONE = "none"  # Save everything (fastest, most memory).
    FULL = "full"  # Save only the layer input; recompute the rest.
    DOTS = "dots"  # Save matmul outputs without batch dims (`checkpoint_dots_with_no_batch_dims`).


# Keys a BailingMoe config.json must carry (the rest have the reference defaults).
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)

# Fields that never appear in config.json.
_RUNTIME_FIELDS = ("attention_impl", "gmm_impl", "remat", "extra", "absent")


@dataclasses.dataclass(frozen=True)
class LingConfig:
    """Architecture of a Ling model: BailingMoe v1 or Ling 2.0 (`model_type` "bailing_moe_v2").

    Attributes mirror `config.json`; `head_dim` of None means
    `hidden_size // num_attention_heads`. The v2 fields (`score_function`,
    `n_group`, `topk_group`, `routed_scaling_factor`,
    `moe_router_enable_expert_bias`, `use_qk_norm`, `partial_rotary_factor`,
    `num_nextn_predict_layers`, `mtp_loss_scaling_factor`) default to the v1
    behaviour; `score_function` of None means the model type's (sigmoid for v2). `extra` holds the JSON of unmodelled
    keys so that a round trip is lossless (use `to_hf_dict`).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int = 0
    head_dim: int | None = None
    num_shared_experts: int = 0
    norm_topk_prob: bool = True
    norm_head: bool = False
    use_bias: bool = True
    use_qkv_bias: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 16384
    tie_word_embeddings: bool = False
    pad_token_id: int | None = 126081
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    hidden_act: str = "silu"
    # Ling 2.0 (bailing_moe_v2) fields; their defaults leave a v1 model unchanged.
    model_type: str = V1
    score_function: ScoreFunction | None = None  # None: softmax for v1, sigmoid for v2
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    moe_router_enable_expert_bias: bool = False
    use_qk_norm: bool = False
    partial_rotary_factor: float = 1.0
    num_nextn_predict_layers: int = 0
    mtp_loss_scaling_factor: float = 0.0
    # Runtime choices (not in config.json).
    attention_impl: AttentionImpl = AttentionImpl.AUTO
    gmm_impl: GmmImpl = GmmImpl.AUTO
    remat: Remat = Remat.NONE
    extra: str = "{}"
    absent: tuple[str, ...] = ()  # modelled keys the source config.json did not have

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("attention_impl", AttentionImpl(self.attention_impl))
        set_("gmm_impl", GmmImpl(self.gmm_impl))
        set_("remat", Remat(self.remat))
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
        set_("score_function", self._model_type_defaults()["score_function"] if self.score_function is None
             else ScoreFunction(self.score_function))
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        self.validate()

    def validate(self) -> None:
        """Raises `ConfigError` naming the first offending key."""
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ConfigError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) must be in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.num_moe_layers:
            if self.num_experts <= 0 or self.moe_intermediate_size <= 0:
                raise ConfigError("num_experts and moe_intermediate_size must be positive "
                                  "when some layers are MoE")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                    f"[1, num_experts={self.num_experts}]")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; Ling uses 'silu'")
        self._validate_v2()
        scaling = self.rope_scaling_dict
        if scaling is not None and scaling.get("type", scaling.get("rope_type")) != "linear":
            raise ConfigError(
                f"rope_scaling {scaling} is not supported: use null or "
                "{'type': 'linear', 'factor': F}")

    def _validate_v2(self) -> None:
        """The Ling 2.0 router, rotary and MTP fields (each message names the keys, the values and the fix)."""
        E, G, kg, k = self.num_experts, self.n_group, self.topk_group, self.num_experts_per_tok
        if G <= 0 or E % G:
            raise ConfigError(f"num_experts ({E}) must be divisible by n_group ({G}): "
                              "set n_group to a divisor of num_experts")
        if not 0 < kg <= G:
            raise ConfigError(f"topk_group ({kg}) must be in [1, n_group={G}]")
        if G > 1 and E // G < 2:
            raise ConfigError(f"n_group ({G}) leaves {E // G} expert per group; a group's score is the sum of its "
                              "2 best experts: use at most num_experts / 2 groups")
        if self.num_moe_layers and k > (E // G) * kg:
            raise ConfigError(f"num_experts_per_tok ({k}) is larger than the {(E // G) * kg} experts of the kept "
                              f"groups (topk_group={kg} groups of num_experts/n_group={E // G}): raise topk_group "
                              "or lower num_experts_per_tok")
        prf = self.partial_rotary_factor
        if not 0 < prf <= 1:
            raise ConfigError(f"partial_rotary_factor ({prf}) must be in (0, 1]")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ConfigError(f"partial_rotary_factor ({prf}) x head_dim ({self.head_dim}) gives a rotary width of "
                              f"{self.rotary_dim}, which must be even and positive: choose a factor giving an even "
                              "width")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError(f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        if self.num_nextn_predict_layers and not self.num_experts:
            raise ConfigError("num_nextn_predict_layers > 0 needs num_experts > 0 (an MTP layer is an MoE block)")

    def _model_type_defaults(self) -> dict[str, Any]:
        """Defaults that depend on `model_type` (the others are the dataclass defaults)."""
        return {"score_function": ScoreFunction.SIGMOID if self.model_type == V2 else ScoreFunction.SOFTMAX,
                "head_dim": self.hidden_size // max(self.num_attention_heads, 1)}

    @property
    def rotary_dim(self) -> int:
        """Width of the rotary part of each head: `int(head_dim * partial_rotary_factor)`, as the reference."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def router_in_float32(self) -> bool:
        """Whether router logits are computed in float32 (Ling 2.0) rather than the compute dtype (v1)."""
        return self.model_type == V2

    @property
    def frozen_pad_embedding(self) -> int | None:
        """The embedding row that gets no gradient from lookups (torch `padding_idx`): `pad_token_id` for Ling 2.0.

        v1 is left as it was (None): its reference has the same rule, but v1 training here predates it.
        """
        return self.pad_token_id if self.model_type == V2 else None

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.num_shared_experts

    @property
    def stacks(self) -> tuple[tuple[str, int, bool], ...]:
        """`(name, layers, is_moe)` of each non-empty scanned layer stack, in order."""
        stacks = ((DENSE_STACK, self.num_dense_layers, False), (MOE_STACK, self.num_moe_layers, True))
        return tuple(s for s in stacks if s[1])

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def replace(self, **changes: Any) -> LingConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime: Any) -> LingConfig:
        """Builds a config from a parsed `config.json`.

        Args:
          d: the JSON object of a BailingMoe `config.json`.
          **runtime: runtime fields (`attention_impl`, `gmm_impl`, `remat`).

        Raises:
          ConfigError: wrong `model_type`, a missing required key, or an
            invalid combination; the message names the key.
        """
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(MODEL_TYPES)}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"config.json is missing required key(s): {', '.join(missing)}")
        names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS)
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        absent = tuple(sorted(names - set(d)))
        if known.get("rope_scaling") is not None:
            known["rope_scaling"] = tuple(sorted(known["rope_scaling"].items()))
        return cls(**known, extra=json.dumps(extra), absent=absent, **runtime)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` object: every modelled field plus the kept extra keys."""
        out = json.loads(self.extra)
        out.setdefault("architectures", [ARCHITECTURES[self.model_type]])
        derived_defaults = self._model_type_defaults()
        for f in dataclasses.fields(self):
            value = self.rope_scaling_dict if f.name == "rope_scaling" else getattr(self, f.name)
            derived = derived_defaults.get(f.name, f.default)
            if isinstance(value, enum.Enum):
                value = value.value
                derived = derived.value if isinstance(derived, enum.Enum) else derived
            if f.name in _RUNTIME_FIELDS or (f.name in self.absent and value == derived):
                continue
            out[f.name] = value
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str, **runtime: Any) -> LingConfig:
        """Reads a `config.json`."""
        with open(path) as f:
            return cls.from_hf_dict(json.load(f), **runtime)
