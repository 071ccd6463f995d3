"""Trains a Ling MoE model.

    python train.py --config configs/demo.py --workdir /tmp/ling_demo [--config.KEY=VALUE ...]

Reads top to bottom: config -> mesh -> abstract state -> shardings -> init or
restore -> loop. Starting again with the same --workdir resumes from the latest
checkpoint (params, optimizer, step, RNG and data position), bit-exactly.
Writes `metrics.jsonl`, TensorBoard events and `checkpoints/` in the workdir.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

import ling_jax
from ling_jax.data import pipeline as data_lib
from ling_jax.io import loading
from ling_jax.model.sharding import (
    batch_sharding,
    like_params,
    logical_shardings,
    make_mesh,
    validate_config,
    validate_shardings,
    with_mesh,
)
from ling_jax.train import distributed
from ling_jax.train import tasks as post_training
from ling_jax.train.checkpointing import CheckpointMismatchError, TrainCheckpointer, abstract_with_shardings
from ling_jax.train.metrics import MetricsWriter, flops_per_token, measure_peak_flops
from ling_jax.train.optim import make_optimizer, make_schedule
from ling_jax.train.step import LossConfig, TrainState, init_train_state
from ling_jax.train.tasks import Task

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class RunError(Exception):
    """A user error that stops the run with a message and a non-zero exit."""


def model_from_config(cfg: ml_collections.ConfigDict) -> ling_jax.LingForCausalLM:
    """The model: a zoo preset (or `init_from`'s config) with overrides, runtime choices and dtypes."""
    overrides = {k: v for k, v in cfg.model_overrides.items() if v is not None}
    runtime = dict(attention_impl=cfg.attention_impl, gmm_impl=cfg.gmm_impl, remat=cfg.remat)
    if cfg.init_from:  # the architecture of the checkpoint training starts from
        arch = loading.init_config(cfg.init_from).replace(**overrides, **runtime)
    else:
        if cfg.get("tokenizer_vocab_size"):
            overrides.setdefault("vocab_size", cfg.tokenizer_vocab_size)
        arch = ling_jax.get_config(cfg.model, **overrides, **runtime)
    return ling_jax.LingForCausalLM(arch, dtype=_DTYPES[cfg.compute_dtype], param_dtype=_DTYPES[cfg.param_dtype])


def tokenizer_from_config(cfg: ml_collections.ConfigDict, workdir: str):
    """The data tokenizer: `data.tokenizer`, or one trained on the data and cached in the workdir."""
    if cfg.data.kind == "synthetic":
        return None
    if cfg.data.tokenizer:
        return ling_jax.load_tokenizer(cfg.data.tokenizer)
    if not cfg.get("tokenizer_vocab_size"):
        raise RunError("set config.data.tokenizer (a tokenizer file or directory) or config.tokenizer_vocab_size "
                       "(train a SentencePiece model on the data)")
    path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(path):
        if jax.process_index() == 0:
            print(f"training a {cfg.tokenizer_vocab_size}-piece SentencePiece tokenizer on the data", flush=True)
            specials = [cfg.data.fim_prefix_token, cfg.data.fim_middle_token, cfg.data.fim_suffix_token]
            texts = data_lib.iter_documents(cfg.data, limit=cfg.get("tokenizer_max_documents", 2000))
            ling_jax.train_sentencepiece(texts, path, cfg.tokenizer_vocab_size, user_defined_symbols=specials)
        sync("tokenizer")
    return ling_jax.load_tokenizer(path)


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def global_batch(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """Assembles the per-process batches into global arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def sample_text(model, params, tokenizer, prompt: str, cfg: ml_collections.ConfigDict) -> str:
    """A completion of `prompt` (sampled with the config's temperature and top-k); SFT / DPO: a chat reply."""
    ids, stop = post_training.sample_prompt(post_training.task_of(cfg), cfg, tokenizer, prompt)
    out = ling_jax.generate(model, params, jnp.asarray([ids]), max_new_tokens=cfg.sample_tokens,
                            temperature=cfg.sample_temperature, top_k=cfg.sample_top_k or None,
                            eos_token_id=stop if stop is not None else -1, rng=jax.random.key(cfg.seed))
    new = [int(t) for t in np.asarray(out)[0, len(ids):]]
    new = new[: new.index(stop)] if stop in new else new
    return prompt + tokenizer.decode(new)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> float:
    """Trains; returns the final loss."""
    distributed.initialize()  # joins a multi-process job (TPU pod, SLURM, JAX_* env); no-op alone
    os.makedirs(workdir, exist_ok=True)
    task = post_training.task_of(cfg)
    model = model_from_config(cfg)
    tokenizer = tokenizer_from_config(cfg, workdir)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        fix = (f"use the tokenizer of {cfg.init_from} (config.data.tokenizer)" if cfg.init_from
               else "set config.model_overrides.vocab_size")
        raise RunError(f"the tokenizer {cfg.data.tokenizer or ''} has {tokenizer.vocab_size} tokens but the "
                       f"model's vocab_size is {model.config.vocab_size}; {fix}")

    # Mesh, optimizer, abstract state and shardings.
    mesh = make_mesh(dict(cfg.mesh))
    schedule = make_schedule(cfg.schedule)
    optimizer = make_optimizer(cfg.optimizer, schedule)
    loss_cfg = LossConfig(**dict(cfg.loss))
    init_fn = lambda rng: init_train_state(ling_jax.init_params(model, rng), optimizer, cfg.seed)  # noqa: E731
    abstract = jax.eval_shape(init_fn, jax.random.key(cfg.seed))
    param_specs = ling_jax.logical_axes(model)
    param_sh = logical_shardings(param_specs, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sh = like_params(abstract.opt_state, abstract.params, param_sh, replicated)  # Adam moments as their params
    state_sh = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
    data_sh = batch_sharding(mesh)
    validate_config(model.config, mesh, batch_size=cfg.batch_size // loss_cfg.accumulation_steps)  # before compiling
    validate_shardings(abstract.params, param_specs, mesh)
    if cfg.batch_size % jax.process_count():
        raise RunError(f"batch_size {cfg.batch_size} must divide by the process count {jax.process_count()}")
    local_batch = cfg.batch_size // jax.process_count()

    # Init or restore.
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints, config=model.config)
    train_iter = post_training.make_train_iterator(task, cfg.data, tokenizer=tokenizer, seq_len=cfg.seq_len,
                                                   batch_size=local_batch, seed=cfg.seed,
                                                   process_index=jax.process_index(),
                                                   process_count=jax.process_count())
    start = ckpt.latest_step()
    if start is not None:
        try:
            state, data_state = ckpt.restore(start, abstract_with_shardings(abstract, state_sh))
        except CheckpointMismatchError as e:
            raise RunError(str(e)) from None
        train_iter.set_state(data_state)
        print(f"resumed from the checkpoint at step {start}", flush=True)
    else:
        start = 0
        state = jax.jit(init_fn, out_shardings=state_sh)(jax.random.key(cfg.seed))
        if cfg.init_from:
            state = state.replace(params=_load_init_params(cfg.init_from, model, abstract.params, param_sh))
    eval_batches = post_training.make_eval_batches(task, cfg.data, tokenizer=tokenizer, seq_len=cfg.seq_len,
                                                   batch_size=local_batch, num_batches=cfg.eval_batches,
                                                   seed=cfg.seed) if cfg.eval_every else []
    ref_params = post_training.reference_params(cfg, model, param_sh) if task is Task.DPO else None

    # The loop.
    step_fn, eval_fn, eval_row = post_training.step_functions(
        task, cfg, model=model, optimizer=optimizer, loss_cfg=loss_cfg, state_sh=state_sh, param_sh=param_sh,
        data_sh=data_sh, ref_params=ref_params)
    step_fn, eval_fn = with_mesh(step_fn, mesh), with_mesh(eval_fn, mesh)  # trace under the mesh and logical rules
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    peak = cfg.peak_flops_per_device or measure_peak_flops()
    flops_tok = flops_per_token(model.config, cfg.seq_len)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
    loss, tokens_since, t_last = float("nan"), 0.0, time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        batch = global_batch(next(train_iter), data_sh)
        state, metrics = step_fn(state, batch)
        tokens_since += cfg.batch_size * cfg.seq_len * (2 if task is Task.DPO else 1)  # DPO: chosen + rejected
        log = step % cfg.log_every == 0 or step == cfg.steps
        if log or step % cfg.checkpoint_every == 0:  # never checkpoint a state that has gone non-finite
            metrics = jax.device_get(metrics)
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (np.isfinite(loss) and np.isfinite(grad_norm)):
                ckpt.close()
                raise RunError(f"loss is {loss} (grad norm {grad_norm}) at step {step}; stopping. The last good "
                               f"checkpoint (step {ckpt.latest_step()}) is kept; lower the learning rate or "
                               "check the data")
        if log:
            elapsed, t_last = time.perf_counter() - t_last, time.perf_counter()
            tps = tokens_since / elapsed
            tokens_since = 0.0
            row = {k: v for k, v in metrics.items() if k != "tokens"}
            row.update(learning_rate=float(schedule(step - 1)), tokens_per_second=tps,
                       mfu=tps * flops_tok / (peak * jax.device_count()),
                       **post_training.data_stats(task, train_iter))
            writer.write(step, row)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
        if cfg.eval_every and step % cfg.eval_every == 0:
            sums = [jax.device_get(eval_fn(state.params, global_batch(b, data_sh))) for b in eval_batches]
            writer.write(step, eval_row(sums))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ckpt.save(step, state, train_iter.get_state())
        bar.update(1)
    bar.close()
    ckpt.close()
    writer.close()
    if cfg.sample_prompt and tokenizer is not None and jax.process_index() == 0:
        print("\n--- sample from the trained model ---\n" + sample_text(
            model, jax.device_get(state.params), tokenizer, cfg.sample_prompt, cfg))
    return loss


def _load_init_params(path: str, model, abstract_params, param_sh):
    """Params from a converted, Hugging Face or train.py checkpoint (`ling_jax.io.loading.load_init_params`), resharded."""
    params = loading.load_init_params(path, loading.init_config(path), model.param_dtype)
    problems = [f"{jax.tree_util.keystr(p)}: expected {a.shape}, found {np.shape(b)}"
                for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                     jax.tree.leaves(params), strict=False) if a.shape != np.shape(b)]
    if problems or jax.tree.structure(params) != jax.tree.structure(abstract_params):
        raise RunError(f"init_from {path} does not match the model: " + ("; ".join(problems[:10]) or "different tree"))
    return jax.device_put(params, param_sh)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the progress bar says enough
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
