"""The memory and communication cost model of a training run, per device, without allocating anything.

Parameters and optimizer state come from `jax.eval_shape` of the training state (the model's `init` and
the project's AdamW); their per-device shards from every weight's logical axis names,
`ling_jax.model.sharding.LOGICAL_RULES` and a `jax.sharding.AbstractMesh`: no device is needed and
Ling-plus plans in seconds. The activation and traffic formulas are stated in the docstrings of
`activation_bytes`, `expert_all_to_all_bytes`, `_weight_collectives` and `recompute_factor`.
`plan()` returns a `Plan`; `python -m ling_jax.cli.plan` prints it. Bad input (an expert axis that does
not divide the experts, a tensor axis that does not divide the kv heads, a batch that does not split
over the data-parallel axes) raises `PlanError` before tracing.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from ling_jax.config import DType, LingConfig, Remat, UserError
from ling_jax.model import sharding
from ling_jax.model.aot import GIB
from ling_jax.model.params import count_params, init_params, logical_axes
from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train.metrics import flops_per_token
from ling_jax.train.optim import default_optimizer_config, make_optimizer
from ling_jax.train.step import init_train_state

__all__ = ["Chip", "LeafPlan", "Plan", "PlanError", "plan"]


BATCH_AXES = sharding.DATA_AXES  # the mesh axes the batch is split over


class PlanError(UserError):
    """Bad plan input; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """An accelerator for the time estimates.

    Attributes:
      hbm_gib, peak_flops: device memory and dense bf16 FLOP/s.
      collective_bandwidth: bytes/s one device moves in ring collectives over the fsdp and data axes.
      a2a_local, a2a_ring: all-to-all bytes/s per device over the expert axis; when `a2a_ring`, the axis
        is a torus ring and bisection-bound (the rate falls as 4 / e, see `a2a_bandwidth`).
    """

    hbm_gib: float
    peak_flops: float
    collective_bandwidth: float
    a2a_local: float
    a2a_ring: bool

    def a2a_bandwidth(self, e: int) -> float:
        """All-to-all bytes/s per device over an expert axis of e devices."""
        return self.a2a_local * (min(1.0, 4.0 / e) if self.a2a_ring else (1.0 if e <= 8 else 50e9 / self.a2a_local))


class Chip(enum.Enum):
    """Accelerators with published figures (see docs/scaling.md for the sources and assumptions)."""

    V5P = "v5p"  # 459 TFLOP/s, 95 GiB, ICI 6 links x 100 GB/s per direction; one torus axis = 200 GB/s
    H100 = "h100"  # 989 TFLOP/s, 80 GB, NVLink 450 GB/s per direction in a node, 400 Gb/s InfiniBand per GPU

    def __str__(self) -> str:
        return self.value

    @property
    def spec(self) -> ChipSpec:
        if self is Chip.V5P:
            return ChipSpec(hbm_gib=95.0, peak_flops=459e12, collective_bandwidth=200e9, a2a_local=200e9,
                            a2a_ring=True)
        return ChipSpec(hbm_gib=80e9 / GIB, peak_flops=989e12, collective_bandwidth=50e9, a2a_local=450e9,
                        a2a_ring=False)


def _layer_elements(cfg: LingConfig, mesh: dict[str, int], moe: bool, compute: DType) -> tuple[float, float, float]:
    """Activation elements per token of one decoder layer: (all of it, saved with FULL, saved with DOTS).

    All of it (`Remat.NONE`, and the working set of one layer in the backward pass otherwise):
      attention: layer input and norm output 2D, q/k/v (N + 2K)H/t, their RoPE outputs (N + K)H/t,
        attention output NH/t, o_proj output D (flash attention: no T x T scores are kept);
      MoE: residual and norm output 2D, router logits and probabilities 2E (float32), permuted rows kD,
        gate / up / silu / product 4kF/t, expert outputs kD, unpermuted outputs kD (float32), the rows
        received and sent back by the expert all-to-all 2kD (when expert > 1), shared experts 4F_s/t + D;
      dense MLP: 2D + 4F_d/t + D.
    FULL saves the layer input (D). DOTS (`checkpoint_dots_with_no_batch_dims`) also saves the q/k/v and
    o_proj outputs, the router logits and the shared (or dense) MLP's gate / up / down outputs; the
    grouped matmuls (kernels, not dots) and the attention core are recomputed.
    """
    D, H, t = cfg.hidden_size, cfg.head_dim, mesh["tensor"]
    N, K = cfg.num_attention_heads, cfg.num_key_value_heads
    f32 = 4 / compute.itemsize  # a float32 value in compute-dtype elements
    attn = 3 * D + (N + 2 * K) * H / t + (N + K) * H / t + N * H / t
    dots = D + (N + 2 * K) * H / t + D
    if moe:
        k, F, Fs, E = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.shared_intermediate_size, cfg.num_experts
        ep = 2 * k * D if mesh["expert"] > 1 else 0
        mlp = 2 * D + 2 * E * f32 + 2 * k * D + 4 * k * F / t + k * D * f32 + ep + 4 * Fs / t + D
        dots += E * f32 + 2 * Fs / t + D
    else:
        mlp = 3 * D + 4 * cfg.intermediate_size / t
        dots += 2 * cfg.intermediate_size / t + D
    return attn + mlp, D, dots


def activation_bytes(cfg: LingConfig, mesh: dict[str, int], tokens: int, seq_len: int, compute: DType,
                     remat: Remat) -> dict[str, int]:
    """Activation estimate per device for one microbatch of `tokens` tokens (see `_layer_elements`).

    saved layers = sum over layers of what the remat policy keeps; backward working set = one layer's
    full set recomputed plus its gradient (2x, not with NONE, where everything is saved already);
    logits = float32 [tokens, V/t] and their gradient, plus the embedding and final-norm outputs.
    `seq_len` is unused: flash attention keeps no T x T state.
    """
    del seq_len
    b = compute.itemsize
    layers = [(False, cfg.num_dense_layers), (True, cfg.num_moe_layers)]
    sizes = {moe: _layer_elements(cfg, mesh, moe, compute) for moe, _ in layers}
    pick = {Remat.NONE: 0, Remat.FULL: 1, Remat.DOTS: 2}[remat]
    saved = sum(n * sizes[moe][pick] for moe, n in layers)
    working = 0 if remat is Remat.NONE else 2 * max(sizes[moe][0] for moe, n in layers if n)
    logits = 2 * cfg.vocab_size / mesh["tensor"] * 4 / b + 2 * cfg.hidden_size
    return {"saved by the layers": int(saved * tokens * b), "backward working set": int(working * tokens * b),
            "logits and loss": int(logits * tokens * b)}


def expert_all_to_all_bytes(cfg: LingConfig, mesh: dict[str, int], tokens: int, compute: DType,
                            remat: Remat) -> dict[str, int]:
    """Bytes one device sends in the expert all-to-alls of one MoE layer for one microbatch.

    A device routes its X tokens to k experts: X*k rows of D values. Transfers: dispatch and combine
    forward, their transposes backward (4), plus the dispatch again when the layer is recomputed (remat).
    Expected (`Exchange.RAGGED` of `ling_jax.model.expert_parallel`, balanced routing): a fraction (e - 1) / e
    of the rows leave the device, X*k*D*b*(e - 1)/e per transfer. Padded (`Exchange.PADDED`, the CPU
    path): every peer gets a full block of cap = X*min(k, E/e) rows, (e - 1)*cap*D*b per transfer.
    """
    e = mesh["expert"]
    if e == 1:
        return {"expected": 0, "padded": 0}
    transfers = 4 + (0 if remat is Remat.NONE else 1)
    row = tokens * cfg.hidden_size * compute.itemsize
    k, cap = cfg.num_experts_per_tok, min(cfg.num_experts_per_tok, cfg.num_experts // e)
    return {"expected": int(transfers * row * k * (e - 1) / e), "padded": transfers * row * cap * (e - 1)}


def recompute_factor(cfg: LingConfig, seq_len: int, remat: Remat) -> float:
    """Executed / useful FLOPs: FULL recomputes each layer's forward, DOTS the grouped matmuls and attention core.

    Forward FLOPs per token: 2 x the active layer parameters (all but the embedding and lm_head) plus
    2*L*T*N*H for causal attention; the routed experts' share is 2*k*3*D*F per MoE layer.
    """
    useful = flops_per_token(cfg, seq_len)
    attention = 2 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    if remat is Remat.FULL:
        layer_params = count_params(cfg)[1] - 2 * cfg.vocab_size * cfg.hidden_size
        return 1 + (2 * layer_params + attention) / useful
    if remat is Remat.DOTS:
        routed = 2 * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.num_moe_layers
        return 1 + (routed + attention) / useful
    return 1.0


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One parameter: `/`-joined path, global shape, mesh axes per dimension, per-device shape and bytes."""

    path: str
    shape: tuple[int, ...]
    spec: tuple[Any, ...]
    shard_shape: tuple[int, ...]
    bytes_per_device: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory (bytes) and per-step communication (bytes one device sends or receives).

    Attributes:
      model, mesh, devices: the model name or config path, the mesh axis sizes and their product.
      tokens_per_device: tokens one device processes per microbatch.
      params, grads, opt_state, activations, total: bytes per device (activations: an estimate, by
        component in `activation_parts`); `hbm` the device memory they are compared against.
      a2a_per_layer: expert all-to-all per MoE layer per step: {"expected", "padded"}.
      comm: per-step bytes by collective (all MoE layers, all microbatches).
      seconds: per-step time estimates: compute at peak and each collective at its bandwidth.
      mfu_bounds: MFU if communication is not overlapped / fully overlapped (compute at peak).
      leaves: every parameter's `LeafPlan`.
    """

    model: str
    mesh: dict[str, int]
    devices: int
    tokens_per_device: int
    params: int
    grads: int
    opt_state: int
    activations: int
    activation_parts: dict[str, int]
    total: int
    hbm: int
    a2a_per_layer: dict[str, int]
    comm: dict[str, int]
    seconds: dict[str, float]
    mfu_bounds: dict[str, float]
    leaves: tuple[LeafPlan, ...]

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm


def mesh_str(mesh: dict[str, int]) -> str:
    return ",".join(f"{a}={s}" for a, s in mesh.items())


def _check(cfg: LingConfig, mesh: dict[str, int], batch_tokens: int, seq_len: int, accumulation: int) -> None:
    """The bad-input errors, with messages that say what to change."""
    e, t = mesh["expert"], mesh["tensor"]
    if cfg.num_experts % e:
        raise PlanError(f"the expert axis ({e}) must divide num_experts ({cfg.num_experts}): each device holds "
                        f"num_experts / expert experts")
    if cfg.num_key_value_heads % t or cfg.num_attention_heads % t:
        raise PlanError(f"the tensor axis ({t}) must divide the kv heads ({cfg.num_key_value_heads}) and the "
                        f"query heads ({cfg.num_attention_heads})")
    if seq_len < 1 or batch_tokens < 1 or batch_tokens % seq_len:
        raise PlanError(f"--batch-tokens ({batch_tokens}) must be a positive multiple of --seq-len ({seq_len})")
    shards = math.prod(mesh[a] for a in BATCH_AXES)
    rows = batch_tokens // seq_len
    if accumulation < 1 or rows % (accumulation * shards):
        raise PlanError(f"the batch of {rows} sequences must split into {accumulation} microbatch(es) over the "
                        f"{shards} data-parallel devices (data*fsdp*expert); {rows} is not divisible by "
                        f"{accumulation * shards}")


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_plans(abstract_params: Any, shardings: Any) -> list[LeafPlan]:
    leaves = []
    flat = jax.tree_util.tree_leaves_with_path(abstract_params)
    for (path, leaf), sh in zip(flat, jax.tree.leaves(shardings), strict=True):
        try:
            shard = sh.shard_shape(leaf.shape)
        except ValueError as err:  # jax's IndivisibleError
            raise PlanError(f"{_path_str(path)} {leaf.shape} cannot be split as {sh.spec} over the mesh: "
                            f"{err}") from None
        spec = tuple(sh.spec) + (None,) * (len(leaf.shape) - len(sh.spec))
        leaves.append(LeafPlan(_path_str(path), tuple(leaf.shape), spec, tuple(shard),
                               math.prod(shard) * jnp.dtype(leaf.dtype).itemsize))
    return leaves


def _opt_bytes(abstract_opt: Any, abstract_params: Any, shardings: Any, mesh: AbstractMesh) -> int:
    """Optimizer-state bytes per device, sharded as `train.py` shards it (`sharding.like_params`)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = sharding.like_params(abstract_opt, abstract_params, shardings, replicated)
    return sum(math.prod(sh.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf, sh in zip(jax.tree.leaves(abstract_opt), jax.tree.leaves(opt_sh), strict=True))


def _axes(spec_entry: Any) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _weight_collectives(leaves: list[LeafPlan], mesh: dict[str, int], compute: DType, grad: DType,
                        microbatches: int) -> dict[str, int]:
    """FSDP all-gathers (forward + backward), gradient reduce-scatter over fsdp and all-reduce over replicas.

    For a weight whose shard S (elements) is split f ways over `fsdp`: each all-gather receives
    (f - 1) * S elements, the reduce-scatter sends (f - 1) * S. Its gradient is also summed over the
    batch axes it is replicated on (r devices: `data`, and `expert` unless it is an expert weight):
    a ring all-reduce sends 2 * (r - 1) / r * S. All per microbatch.
    """
    gather = scatter = allreduce = 0
    for lp in leaves:
        on = {a for entry in lp.spec for a in _axes(entry)}
        shard = math.prod(lp.shard_shape)
        f = mesh["fsdp"] if "fsdp" in on else 1
        r = math.prod(mesh[a] for a in BATCH_AXES if a not in on)
        gather += 2 * (f - 1) * shard * compute.itemsize
        scatter += (f - 1) * shard * grad.itemsize
        allreduce += int(2 * (r - 1) / r * shard * grad.itemsize)
    return {"fsdp_all_gather": gather * microbatches, "grad_reduce_scatter": scatter * microbatches,
            "grad_all_reduce": allreduce * microbatches}


def training_setup(cfg: LingConfig, param_dtype: DType, compute_dtype: DType, mu_dtype: DType | None
                   ) -> tuple[LingForCausalLM, optax.GradientTransformation]:
    """The model and the project's AdamW of a planned run (what the plan measures and `--compile` compiles)."""
    opt_cfg = default_optimizer_config()
    opt_cfg.mu_dtype = None if mu_dtype is None else mu_dtype.value
    model = LingForCausalLM(cfg, dtype=compute_dtype.jnp, param_dtype=param_dtype.jnp)
    return model, make_optimizer(opt_cfg, optax.constant_schedule(1e-4))


def plan(cfg: LingConfig, mesh: dict[str, int], *, batch_tokens: int, seq_len: int, name: str = "",
         param_dtype: DType = DType.FLOAT32, compute_dtype: DType = DType.BFLOAT16, remat: Remat = Remat.FULL,
         accumulation_steps: int = 1, mu_dtype: DType | None = None, chip: Chip = Chip.V5P,
         hbm_gib: float | None = None) -> Plan:
    """The per-device memory and per-step communication of a training run.

    Args:
      cfg: the architecture (its `remat` is replaced by `remat`).
      mesh: axis sizes (see `parse_mesh`).
      batch_tokens: global tokens per optimizer step.
      seq_len: tokens per sequence.
      param_dtype: master weights, gradients and optimizer state.
      compute_dtype: activations and matmul inputs.
      remat: what each decoder layer saves for the backward pass.
      accumulation_steps: microbatches per step.
      mu_dtype: AdamW first-moment dtype (None: the parameter dtype).
      chip: the accelerator (peak FLOP/s, HBM, interconnect for the time estimates).
      hbm_gib: device memory to compare against (default: the chip's).
      name: how the model is called in the printed plan.

    Raises:
      PlanError: bad input (see the module docstring), before any tracing.
    """
    cfg = cfg.replace(remat=remat)
    _check(cfg, mesh, batch_tokens, seq_len, accumulation_steps)
    abstract_mesh = AbstractMesh(tuple(mesh.values()), tuple(mesh))
    try:  # the model's dimensions against the mesh, by the sharding module's own rules
        sharding.validate_config(cfg, abstract_mesh, rules=sharding.LOGICAL_RULES)
    except sharding.ShardingError as e:
        raise PlanError(str(e)) from None
    spec: ChipSpec = chip.spec
    lm, optimizer = training_setup(cfg, param_dtype, compute_dtype, mu_dtype)
    state = jax.eval_shape(lambda key: init_train_state(init_params(lm, key), optimizer), jax.random.key(0))
    shardings = sharding.logical_shardings(logical_axes(lm), abstract_mesh, rules=sharding.LOGICAL_RULES)
    leaves = _leaf_plans(state.params, shardings)

    devices = math.prod(mesh.values())
    tokens = batch_tokens // accumulation_steps // math.prod(mesh[a] for a in BATCH_AXES)
    params = sum(lp.bytes_per_device for lp in leaves)
    grads = params * (2 if accumulation_steps > 1 else 1)  # the accumulator plus one microbatch's gradients
    opt = _opt_bytes(state.opt_state, state.params, shardings, abstract_mesh)
    parts = activation_bytes(cfg, mesh, tokens, seq_len, compute_dtype, remat)
    acts = sum(parts.values())

    a2a = expert_all_to_all_bytes(cfg, mesh, tokens, compute_dtype, remat)
    a2a = {k: v * accumulation_steps for k, v in a2a.items()}
    comm = {"expert_all_to_all": a2a["expected"] * cfg.num_moe_layers,
            **_weight_collectives(leaves, mesh, compute_dtype, param_dtype, accumulation_steps)}
    t = mesh["tensor"]
    if t > 1:  # psum of the attention and MLP outputs, forward and backward, every layer
        comm["tensor_all_reduce"] = int(4 * cfg.num_hidden_layers * tokens * cfg.hidden_size * compute_dtype.itemsize
                                        * 2 * (t - 1) / t) * accumulation_steps
    useful = flops_per_token(cfg, seq_len) * batch_tokens / devices
    seconds = {"compute_at_peak": useful * recompute_factor(cfg, seq_len, remat) / spec.peak_flops,
               "expert_all_to_all": comm["expert_all_to_all"] / spec.a2a_bandwidth(mesh["expert"]),
               "weight_collectives": sum(v for k, v in comm.items() if k != "expert_all_to_all")
               / spec.collective_bandwidth}
    comm_s = sum(v for k, v in seconds.items() if k != "compute_at_peak")
    ideal = useful / spec.peak_flops
    bounds = {"no_overlap": ideal / (seconds["compute_at_peak"] + comm_s),
              "full_overlap": ideal / max(seconds["compute_at_peak"], comm_s)}
    hbm = int((hbm_gib if hbm_gib is not None else spec.hbm_gib) * GIB)
    return Plan(model=name, mesh=mesh, devices=devices, tokens_per_device=tokens, params=params, grads=grads,
                opt_state=opt, activations=acts, activation_parts=parts, total=params + grads + opt + acts,
                hbm=hbm, a2a_per_layer=a2a, comm=comm, seconds=seconds, mfu_bounds=bounds, leaves=tuple(leaves))
