"""What `train.py` does differently per task: pre-training, SFT and DPO (`config.task`).

* `Task.PRETRAIN`: documents (`ling_jax.data`), next-token loss on every token.
* `Task.SFT`: chat conversations (`ling_jax.sft_data`), the same train step with the loss on assistant tokens.
* `Task.DPO`: preference pairs (`ling_jax.dpo_data`), `ling_jax.dpo.dpo_step` against a frozen reference:
  the weights of `config.init_from`, loaded again when a run resumes (checkpoints hold only the policy).

`config.init_from` names where training starts: a `convert_weights.py hf-to-jax` directory, a Hugging Face
directory, a `train.py` checkpoint step directory (`WORKDIR/checkpoints/N`) or a `train.py` workdir (its latest
checkpoint). The model architecture then comes from that checkpoint's config (`init_config`); `config.model`
is not used and `config.model_overrides` may change only what keeps the parameter shapes.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ling_jax.data import chat
from ling_jax.data import dpo as dpo_data
from ling_jax.data import pipeline as data_lib
from ling_jax.data import sft as sft_data
from ling_jax.data.tokenizer import Tokenizer
from ling_jax.io.loading import load_init_params
from ling_jax.train import dpo
from ling_jax.train.step import eval_step, train_step

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Task(enum.Enum):
    """What a run trains (`config.task`)."""

    PRETRAIN = "pretrain"  # Next-token prediction (+ FIM) on documents.
    SFT = "sft"  # Supervised fine-tuning on chat conversations, loss on assistant tokens.
    DPO = "dpo"  # Direct Preference Optimization on chosen / rejected pairs.


def task_of(cfg: ml_collections.ConfigDict) -> Task:
    """The run's task (clear error for an unknown value)."""
    value = cfg.get("task", Task.PRETRAIN.value)
    try:
        return Task(value)
    except ValueError:
        raise ValueError(f"config.task={value!r}; expected one of {[t.value for t in Task]}") from None


def make_train_iterator(task: Task, data_cfg: ml_collections.ConfigDict, **kwargs: Any):
    """The task's training iterator (`get_state`, `set_state`, `stats`); kwargs as `data.make_train_iterator`."""
    make = {Task.PRETRAIN: data_lib.make_train_iterator, Task.SFT: sft_data.make_sft_iterator,
            Task.DPO: dpo_data.make_dpo_iterator}[task]
    return make(data_cfg, **kwargs)


def make_eval_batches(task: Task, data_cfg: ml_collections.ConfigDict, **kwargs: Any) -> list[dict[str, np.ndarray]]:
    """The task's held-out batches; kwargs as `data.make_eval_batches`."""
    make = {Task.PRETRAIN: data_lib.make_eval_batches, Task.SFT: sft_data.make_sft_eval_batches,
            Task.DPO: dpo_data.make_dpo_eval_batches}[task]
    return make(data_cfg, **kwargs)


def data_stats(task: Task, iterator: Any) -> dict[str, int]:
    """The iterator's counters as metric names: `skipped_*` (pre-training) or `data/*` (SFT, DPO)."""
    prefix = "skipped_" if task is Task.PRETRAIN else "data/"
    return {f"{prefix}{k}": v for k, v in iterator.stats().items()}


def dpo_config(cfg: ml_collections.ConfigDict) -> dpo.DpoConfig:
    """The DPO loss settings of a run (`config.dpo`, `config.loss.accumulation_steps`)."""
    if cfg.loss.z_loss_weight or cfg.loss.balance_loss_weight:
        raise ValueError("DPO trains on the preference loss only: set loss.z_loss_weight=0 and "
                         "loss.balance_loss_weight=0")
    return dpo.DpoConfig(beta=float(cfg.dpo.beta), label_smoothing=float(cfg.dpo.label_smoothing),
                         accumulation_steps=int(cfg.loss.accumulation_steps))


def reference_params(cfg: ml_collections.ConfigDict, model: Any, param_sh: Any) -> Any:
    """The frozen DPO reference: the `init_from` weights, in `dpo.reference_dtype`, sharded like the params."""
    if not cfg.init_from:
        raise ValueError("DPO needs config.init_from: the policy starts from it and it is the frozen reference")
    name = cfg.dpo.get("reference_dtype", "")
    if name and name not in _DTYPES:
        raise ValueError(f"dpo.reference_dtype={name!r}; expected one of {sorted(_DTYPES)} or '' (param_dtype)")
    dtype = _DTYPES[name] if name else model.param_dtype
    return jax.device_put(load_init_params(cfg.init_from, model.config, dtype), param_sh)


def step_functions(task: Task, cfg: ml_collections.ConfigDict, *, model: Any, optimizer: Any, loss_cfg: Any,
                   state_sh: Any, param_sh: Any, data_sh: Any, ref_params: Any = None,
                   ) -> tuple[Callable, Callable, Callable[[list[dict[str, Any]]], dict[str, float]]]:
    """`(step_fn(state, batch), eval_fn(params, batch), eval_row(sums))`, jitted for the task.

    `eval_row` turns the host copies of `eval_fn`'s outputs over the eval batches into a metrics row.
    """
    if task is not Task.DPO:
        step = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, loss_cfg=loss_cfg),
                       in_shardings=(state_sh, data_sh), out_shardings=(state_sh, None), donate_argnums=0)
        evaluate = jax.jit(functools.partial(eval_step, model=model), in_shardings=(param_sh, data_sh))

        def eval_row(sums: list[dict[str, Any]]) -> dict[str, float]:
            tokens = sum(float(s["tokens"]) for s in sums)
            return {"eval_loss": sum(float(s["nll_sum"]) for s in sums) / max(tokens, 1.0)}

        return step, evaluate, eval_row
    dcfg = dpo_config(cfg)
    ref_sh = jax.tree.map(lambda x: x.sharding, ref_params)
    dstep = jax.jit(functools.partial(dpo.dpo_step, model=model, optimizer=optimizer, dpo_cfg=dcfg),
                    in_shardings=(state_sh, ref_sh, data_sh), out_shardings=(state_sh, None), donate_argnums=0)
    deval = jax.jit(functools.partial(dpo.dpo_eval_step, model=model, dpo_cfg=dcfg),
                    in_shardings=(param_sh, ref_sh, data_sh))

    def dpo_eval_row(sums: list[dict[str, Any]]) -> dict[str, float]:
        pairs = max(sum(float(s["pairs"]) for s in sums), 1.0)
        return {f"eval_{k}": sum(float(s[k]) for s in sums) / pairs for k in sums[0] if k != "pairs"}

    return (lambda state, batch: dstep(state, ref_params, batch),
            lambda params, batch: deval(params, ref_params, batch), dpo_eval_row)


def sample_prompt(task: Task, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, prompt: str,
                  ) -> tuple[list[int], int | None]:
    """Prompt ids for the end-of-run sample and the token that ends it: raw text (pre-training) or the
    prompt as a user turn of the chat template (SFT, DPO), which ends at the template's end-of-text token."""
    add_bos = bool(cfg.data.get("add_bos", False)) and tokenizer.bos_id is not None
    if task is Task.PRETRAIN:
        return tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None), tokenizer.eos_id
    template = chat.ChatTemplate.from_config(cfg.data.get("chat", chat.default_chat_config()))
    ids = template.prompt_ids(tokenizer, [chat.Message(chat.Role.USER, prompt)], add_bos=add_bos)
    return ids, template.check_tokenizer(tokenizer)
