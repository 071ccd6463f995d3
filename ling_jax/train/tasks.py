"""What a run trains (`config.task`): one `TaskSpec` per task, so `train.py` has no per-task branches.

* `Task.PRETRAIN`: documents (`ling_jax.data.pipeline`), next-token loss on every token.
* `Task.SFT`: chat conversations (`ling_jax.data.sft`), the same train step with the loss on assistant tokens.
* `Task.DPO`: preference pairs (`ling_jax.data.dpo`), `ling_jax.train.dpo.dpo_step` against a frozen reference:
  the weights of `config.init_from`, loaded again when a run resumes (checkpoints hold only the policy).

A `TaskSpec` names the task's data (training iterator, held-out batches), how many sequences one batch row
feeds the model, how its jitted steps are built (`StepContext` -> `Steps`) and whether the end-of-run sample
is a chat reply. Where training starts (`config.init_from`) is resolved by `ling_jax.io.loading`.

A pre-training run on a mixture (`config.data.sources`, `config.stages`; `ling_jax.data.stages`) gets its data
from `train_iterator` / `eval_batches`, its schedule from `schedule_config` and its stage marks from
`stage_starts`; a run without them is unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from ling_jax.config import ConfigError, DType
from ling_jax.data import chat
from ling_jax.data import dpo as dpo_data
from ling_jax.data import pipeline as data_lib
from ling_jax.data import sft as sft_data
from ling_jax.data import stages as stages_lib
from ling_jax.data.chat_template import chat_template_for
from ling_jax.data.mixture import parse_sources
from ling_jax.data.tokenizer import Tokenizer
from ling_jax.io.loading import load_init_params
from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train import dpo
from ling_jax.train.optim import ScheduleKind
from ling_jax.train.step import LossConfig, eval_step, train_step

Sums = dict[str, Any]  # host copies of one eval batch's summed metrics


class Task(enum.Enum):
    """What a run trains (`config.task`)."""

    PRETRAIN = "pretrain"  # Next-token prediction (+ FIM) on documents.
    SFT = "sft"  # Supervised fine-tuning on chat conversations, loss on assistant tokens.
    DPO = "dpo"  # Direct Preference Optimization on chosen / rejected pairs.


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What every task needs to build its jitted steps."""

    cfg: ml_collections.ConfigDict
    model: LingForCausalLM
    optimizer: optax.GradientTransformation
    loss_cfg: LossConfig
    state_sh: Any  # shardings of the TrainState
    param_sh: Any  # shardings of the params
    data_sh: Any  # sharding of every batch array


@dataclasses.dataclass(frozen=True)
class Steps:
    """A task's jitted steps: `train(state, batch) -> (state, metrics)`, `evaluate(params, batch) -> sums`, and
    `eval_row(sums of every held-out batch) -> metrics row`."""

    train: Callable[[Any, Any], tuple[Any, dict[str, Any]]]
    evaluate: Callable[[Any, Any], Sums]
    eval_row: Callable[[list[Sums]], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How `train.py` runs one task."""

    task: Task
    train_iterator: Callable[..., Any]  # (data_cfg, *, tokenizer, seq_len, batch_size, seed, process_index, ...)
    eval_batches: Callable[..., list[dict[str, Any]]]  # (data_cfg, *, tokenizer, seq_len, batch_size, ...)
    sequences_per_row: int  # sequences the model reads per batch row (DPO: chosen and rejected)
    build_steps: Callable[[StepContext], Steps]
    chat_sample: bool  # the end-of-run sample is the assistant's reply to the prompt as a user turn


def _lm_eval_row(sums: list[Sums]) -> dict[str, float]:
    tokens = sum(float(s["tokens"]) for s in sums)
    return {"eval_loss": sum(float(s["nll_sum"]) for s in sums) / max(tokens, 1.0)}


def _lm_steps(ctx: StepContext) -> Steps:
    """Pre-training and SFT: `train_step` / `eval_step` (SFT batches carry their loss mask in `targets`)."""
    step = jax.jit(functools.partial(train_step, model=ctx.model, optimizer=ctx.optimizer, loss_cfg=ctx.loss_cfg),
                   in_shardings=(ctx.state_sh, ctx.data_sh), out_shardings=(ctx.state_sh, None), donate_argnums=0)
    evaluate = jax.jit(functools.partial(eval_step, model=ctx.model), in_shardings=(ctx.param_sh, ctx.data_sh))
    return Steps(step, evaluate, _lm_eval_row)


def dpo_config(cfg: ml_collections.ConfigDict) -> dpo.DpoConfig:
    """The DPO loss settings of a run (`config.dpo`, `config.loss.accumulation_steps`)."""
    if cfg.loss.z_loss_weight or cfg.loss.balance_loss_weight:
        raise ConfigError("DPO trains on the preference loss only: set loss.z_loss_weight=0 and "
                          "loss.balance_loss_weight=0")
    return dpo.DpoConfig(beta=float(cfg.dpo.beta), label_smoothing=float(cfg.dpo.label_smoothing),
                         accumulation_steps=int(cfg.loss.accumulation_steps))


def reference_params(cfg: ml_collections.ConfigDict, model: LingForCausalLM, param_sh: Any) -> Any:
    """The frozen DPO reference: the `init_from` weights, in `dpo.reference_dtype`, sharded like the params."""
    if not cfg.init_from:
        raise ConfigError("DPO needs config.init_from: the policy starts from it and it is the frozen reference")
    name = cfg.dpo.get("reference_dtype", "")
    dtype = DType.parse(name, "config.dpo.reference_dtype").jnp if name else model.param_dtype
    return jax.device_put(load_init_params(cfg.init_from, model.config, dtype), param_sh)


def _dpo_eval_row(sums: list[Sums]) -> dict[str, float]:
    pairs = max(sum(float(s["pairs"]) for s in sums), 1.0)
    return {f"eval_{k}": sum(float(s[k]) for s in sums) / pairs for k in sums[0] if k != "pairs"}


def _dpo_steps(ctx: StepContext) -> Steps:
    """DPO: the policy's `dpo_step` / `dpo_eval_step` against the reference, bound into the steps."""
    dcfg = dpo_config(ctx.cfg)
    ref = reference_params(ctx.cfg, ctx.model, ctx.param_sh)
    ref_sh = jax.tree.map(lambda x: x.sharding, ref)
    step = jax.jit(functools.partial(dpo.dpo_step, model=ctx.model, optimizer=ctx.optimizer, dpo_cfg=dcfg),
                   in_shardings=(ctx.state_sh, ref_sh, ctx.data_sh), out_shardings=(ctx.state_sh, None),
                   donate_argnums=0)
    evaluate = jax.jit(functools.partial(dpo.dpo_eval_step, model=ctx.model, dpo_cfg=dcfg),
                       in_shardings=(ctx.param_sh, ref_sh, ctx.data_sh))
    return Steps(lambda state, batch: step(state, ref, batch), lambda params, batch: evaluate(params, ref, batch),
                 _dpo_eval_row)


TASKS: dict[Task, TaskSpec] = {
    Task.PRETRAIN: TaskSpec(Task.PRETRAIN, data_lib.make_train_iterator, data_lib.make_eval_batches, 1,
                            _lm_steps, chat_sample=False),
    Task.SFT: TaskSpec(Task.SFT, sft_data.make_sft_iterator, sft_data.make_sft_eval_batches, 1,
                       _lm_steps, chat_sample=True),
    Task.DPO: TaskSpec(Task.DPO, dpo_data.make_dpo_iterator, dpo_data.make_dpo_eval_batches, 2,
                       _dpo_steps, chat_sample=True),
}


def task_spec(cfg: ml_collections.ConfigDict) -> TaskSpec:
    """The spec of the run's `config.task` (`ConfigError` for an unknown value)."""
    value = cfg.get("task", Task.PRETRAIN.value)
    try:
        return TASKS[Task(value)]
    except ValueError:
        raise ConfigError(f"config.task={value!r}; expected one of {[t.value for t in Task]}") from None


def data_stats(iterator: Any) -> dict[str, int]:
    """The data iterator's counters (`ling_jax.data.counting.Count`) as metric names `data/<count>`."""
    return {f"data/{k}": v for k, v in iterator.stats().items()}


def sample_prompt(spec: TaskSpec, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, prompt: str,
                  ) -> tuple[list[int], int | None]:
    """Prompt ids for the end-of-run sample and the token that ends it: raw text (pre-training) or the
    prompt as a user turn of the chat template (SFT, DPO; the checkpoint's own, else Ling's), which ends at the
    template's end-of-turn token."""
    if not spec.chat_sample:
        return tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None), tokenizer.eos_id
    add_bos = bool(cfg.data.get("add_bos", False)) and tokenizer.bos_id is not None
    template = chat_template_for(tokenizer, cfg.data.get("chat", chat.default_chat_config()))
    ids = template.prompt_ids(tokenizer, [chat.Message(chat.Role.USER, prompt)], add_bos=add_bos)
    return ids, template.check_tokenizer(tokenizer)


def stage_plan(cfg: ml_collections.ConfigDict) -> tuple[stages_lib.Stage, ...]:
    """The run's stages (`config.stages`; one stage over the run without them), mixtures resolved."""
    return stages_lib.plan_stages(list(cfg.get("stages", None) or []), parse_sources(cfg.data),
                                  tokens_per_step=int(cfg.batch_size) * int(cfg.seq_len), total_steps=int(cfg.steps))


def stage_starts(cfg: ml_collections.ConfigDict) -> dict[int, str]:
    """`{first step (counted from 1, as logged): stage name}` of every stage of `config.stages` ({} without)."""
    if not cfg.get("stages", None):
        return {}
    return {stage.start + 1: stage.name for stage in stage_plan(cfg)}


def schedule_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The learning-rate schedule section: `config.schedule`, or the stages' phases one after the other (from
    `config.schedule.init_value`) when the stages have schedules."""
    plan = stage_plan(cfg) if cfg.get("stages", None) else ()
    if not any(stage.phases for stage in plan):
        return cfg.schedule
    phases = [dict(p) for stage in plan for p in stage.phases]
    return ml_collections.ConfigDict(dict(kind=ScheduleKind.PHASES.value, init_value=float(cfg.schedule.init_value),
                                          phases=phases))


def _mixture(spec: TaskSpec, cfg: ml_collections.ConfigDict) -> bool:
    if parse_sources(cfg.data) is None:
        return False
    if spec.task is not Task.PRETRAIN:
        raise ConfigError(f"config.data.sources (a mixture) is for task=pretrain, not task={spec.task.value}; "
                          "give SFT / DPO one data.path")
    return True


def train_iterator(spec: TaskSpec, cfg: ml_collections.ConfigDict, **kwargs: Any) -> Any:
    """The run's training iterator: the task's, or the staged mixture's (`kwargs` as `TaskSpec.train_iterator`)."""
    if _mixture(spec, cfg):
        return stages_lib.make_staged_iterator(cfg.data, stage_plan(cfg), **kwargs)
    return spec.train_iterator(cfg.data, **kwargs)


def eval_batches(spec: TaskSpec, cfg: ml_collections.ConfigDict, **kwargs: Any) -> list[dict[str, Any]]:
    """The run's held-out batches: the task's, or the first stage's mixture's (`kwargs` as `TaskSpec.eval_batches`)."""
    if _mixture(spec, cfg):
        return stages_lib.make_mixture_eval_batches(cfg.data, stage_plan(cfg), **kwargs)
    return spec.eval_batches(cfg.data, **kwargs)
