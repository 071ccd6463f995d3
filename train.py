"""Trains a Ling MoE model.

    python train.py --config configs/demo.py --workdir /tmp/ling_demo [--config.KEY=VALUE ...]

Reads top to bottom: config -> mesh -> abstract state -> shardings -> init or
restore -> loop. Starting again with the same --workdir resumes from the latest
checkpoint (params, optimizer, step and data position), bit-exactly.
Writes `metrics.jsonl`, TensorBoard events and `checkpoints/` in the workdir.
What differs per task (pre-training, SFT, DPO) is its `ling_jax.train.tasks.TaskSpec`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

import ling_jax
from ling_jax.config import DType, UserError
from ling_jax.data import pipeline as data_lib
from ling_jax.data.settings import SourceKind, option
from ling_jax.io import loading
from ling_jax.model.aot import hbm_bytes, tpu_topology
from ling_jax.model.sharding import (
    abstract_with_shardings,
    batch_sharding,
    make_mesh,
    validate_config,
    validate_shardings,
    with_mesh,
)
from ling_jax.train import distributed, tasks
from ling_jax.train.aot import compile_train_step
from ling_jax.train.checkpointing import TrainCheckpointer
from ling_jax.train.metrics import MetricsWriter, flops_per_token, measure_peak_flops
from ling_jax.train.optim import make_optimizer, make_schedule
from ling_jax.train.step import LossConfig, TrainState, init_train_state, train_state_shardings

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")


class RunError(UserError):
    """A problem with the run that stops it with a message and a non-zero exit."""


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
    return ling_jax.LingForCausalLM(arch, dtype=DType.parse(cfg.compute_dtype, "config.compute_dtype").jnp,
                                    param_dtype=DType.parse(cfg.param_dtype, "config.param_dtype").jnp)


def tokenizer_from_config(cfg: ml_collections.ConfigDict, workdir: str, vocab_size: int):
    """The data tokenizer: `data.tokenizer`, or one trained on the data and cached in the workdir."""
    if option(cfg.data, "kind", SourceKind) is SourceKind.SYNTHETIC:
        return None
    if cfg.data.tokenizer:
        tokenizer = ling_jax.load_tokenizer(cfg.data.tokenizer)
    elif cfg.get("tokenizer_vocab_size"):
        tokenizer = _trained_tokenizer(cfg, os.path.join(workdir, "tokenizer.model"))
    else:
        raise RunError("set config.data.tokenizer (a tokenizer file or directory) or config.tokenizer_vocab_size "
                       "(train a SentencePiece model on the data)")
    if tokenizer.vocab_size > vocab_size:
        fix = (f"use the tokenizer of {cfg.init_from} (config.data.tokenizer)" if cfg.init_from
               else "set config.model_overrides.vocab_size")
        raise RunError(f"the tokenizer {cfg.data.tokenizer or ''} has {tokenizer.vocab_size} tokens but the "
                       f"model's vocab_size is {vocab_size}; {fix}")
    return tokenizer


def _trained_tokenizer(cfg: ml_collections.ConfigDict, path: str):
    """A SentencePiece model of `tokenizer_vocab_size` pieces trained on the data (process 0), cached at `path`."""
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


def init_params_from(path: str, model, abstract_params, param_sh):
    """Params from a converted, Hugging Face or train.py checkpoint (`ling_jax.io.loading`), resharded."""
    params = loading.load_init_params(path, loading.init_config(path), model.param_dtype)
    problems = [f"{jax.tree_util.keystr(p)}: expected {a.shape}, found {np.shape(b)}"
                for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                     jax.tree.leaves(params), strict=False) if a.shape != np.shape(b)]
    if problems or jax.tree.structure(params) != jax.tree.structure(abstract_params):
        raise RunError(f"init_from {path} does not match the model: " + ("; ".join(problems[:10]) or "different tree"))
    return jax.device_put(params, param_sh)


def sample_text(model, params, tokenizer, prompt: str, cfg: ml_collections.ConfigDict) -> str:
    """A completion of `prompt` (sampled with the config's temperature and top-k); SFT / DPO: a chat reply."""
    ids, stop = tasks.sample_prompt(tasks.task_spec(cfg), cfg, tokenizer, prompt)
    out = ling_jax.generate(model, params, jnp.asarray([ids]), max_new_tokens=cfg.sample_tokens,
                            temperature=cfg.sample_temperature, top_k=cfg.sample_top_k or None,
                            eos_token_id=stop if stop is not None else -1, rng=jax.random.key(cfg.seed))
    new = [int(t) for t in np.asarray(out)[0, len(ids):]]
    new = new[: new.index(stop)] if stop in new else new
    return prompt + tokenizer.decode(new)


@dataclasses.dataclass
class Loop:
    """What the training loop reads and writes besides the state."""

    cfg: ml_collections.ConfigDict
    spec: tasks.TaskSpec
    steps: tasks.Steps
    train_iter: Any
    eval_batches: list[dict[str, np.ndarray]]
    data_sh: Any
    ckpt: TrainCheckpointer
    writer: MetricsWriter
    schedule: Any
    flops_per_token: float
    peak_flops: float

    def run(self, state: TrainState, start: int) -> tuple[TrainState, float]:
        """Steps `start + 1 .. cfg.steps`: train, log, evaluate, checkpoint. Returns the state and the last loss."""
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
        loss, tokens, t_last = float("nan"), 0.0, time.perf_counter()
        for step in range(start + 1, cfg.steps + 1):
            state, metrics = self.steps.train(state, global_batch(next(self.train_iter), self.data_sh))
            tokens += cfg.batch_size * cfg.seq_len * self.spec.sequences_per_row
            log = step % cfg.log_every == 0 or step == cfg.steps
            if log or step % cfg.checkpoint_every == 0:  # never checkpoint a state that has gone non-finite
                metrics = jax.device_get(metrics)
                loss = self._check_finite(metrics, step)
            if log:
                elapsed, t_last = time.perf_counter() - t_last, time.perf_counter()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
                self._log(step, metrics, tokens / elapsed)
                tokens = 0.0
            if cfg.eval_every and step % cfg.eval_every == 0:
                sums = [jax.device_get(self.steps.evaluate(state.params, global_batch(b, self.data_sh)))
                        for b in self.eval_batches]
                self.writer.write(step, self.steps.eval_row(sums))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self.ckpt.save(step, state, self.train_iter.get_state())
            bar.update(1)
        bar.close()
        return state, loss

    def _check_finite(self, metrics: dict[str, Any], step: int) -> float:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            self.ckpt.close()
            raise RunError(f"loss is {loss} (grad norm {grad_norm}) at step {step}; stopping. The last good "
                           f"checkpoint (step {self.ckpt.latest_step()}) is kept; lower the learning rate or "
                           "check the data")
        return loss

    def _log(self, step: int, metrics: dict[str, Any], tokens_per_second: float) -> None:
        row = {k: v for k, v in metrics.items() if k != "tokens"}
        row.update(learning_rate=float(self.schedule(step - 1)), tokens_per_second=tokens_per_second,
                   mfu=tokens_per_second * self.flops_per_token / (self.peak_flops * jax.device_count()),
                   **tasks.data_stats(self.train_iter))
        self.writer.write(step, row)


def compile_only(cfg: ml_collections.ConfigDict, model: ling_jax.LingForCausalLM) -> None:
    """`config.compile_only`: the run's train step compiled for its mesh (of `compile_topology` TPU devices, or
    of this host's devices) and the compiler's memory per device, printed; nothing is trained or written."""
    devices = tpu_topology(cfg.compile_topology) if cfg.compile_topology else jax.devices()
    mesh = make_mesh(dict(cfg.mesh), devices=devices)
    optimizer = make_optimizer(cfg.optimizer, make_schedule(cfg.schedule))
    program = compile_train_step(model, optimizer, LossConfig(**dict(cfg.loss)), mesh, batch_size=cfg.batch_size,
                                 seq_len=cfg.seq_len)
    hbm = hbm_bytes(devices[0])
    print(f"train_step compiled for {cfg.compile_topology or jax.default_backend()} ({len(devices)} x "
          f"{devices[0].device_kind}) in {program.seconds:.0f} s; memory per device:")
    for name, value in program.memory.rows():
        print(f"  {name:<20}{value / 2**30:9.2f} GiB")
    if hbm:
        verdict = "fits" if program.memory.peak <= hbm else "DOES NOT FIT"
        print(f"  {verdict} in {hbm / 2**30:.1f} GiB HBM ({100 * program.memory.peak / hbm:.0f}%)")


def run(cfg: ml_collections.ConfigDict, workdir: str) -> float:
    """Trains; returns the final loss (NaN with `config.compile_only`, which only compiles)."""
    distributed.initialize()  # joins a multi-process job (TPU pod, SLURM, JAX_* env); no-op alone
    spec = tasks.task_spec(cfg)
    model = model_from_config(cfg)
    if cfg.get("compile_only"):
        compile_only(cfg, model)
        return float("nan")
    os.makedirs(workdir, exist_ok=True)
    tokenizer = tokenizer_from_config(cfg, workdir, model.config.vocab_size)
    if cfg.batch_size % jax.process_count():
        raise RunError(f"batch_size {cfg.batch_size} must divide by the process count {jax.process_count()}")
    data_args = dict(tokenizer=tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size // jax.process_count(),
                     seed=cfg.seed)

    # Mesh, optimizer, abstract state and shardings.
    mesh = make_mesh(dict(cfg.mesh))
    schedule = make_schedule(cfg.schedule)
    optimizer = make_optimizer(cfg.optimizer, schedule)
    loss_cfg = LossConfig(**dict(cfg.loss))
    init_fn = lambda rng: init_train_state(ling_jax.init_params(model, rng), optimizer)  # noqa: E731
    abstract = jax.eval_shape(init_fn, jax.random.key(cfg.seed))
    param_specs = ling_jax.logical_axes(model)
    state_sh, param_sh = train_state_shardings(abstract, param_specs, mesh)
    data_sh = batch_sharding(mesh)
    validate_config(model.config, mesh, batch_size=cfg.batch_size // loss_cfg.accumulation_steps)  # before compiling
    validate_shardings(abstract.params, param_specs, mesh)

    # Init or restore.
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints, config=model.config)
    train_iter = spec.train_iterator(cfg.data, **data_args, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    start = ckpt.latest_step()
    if start is not None:
        state, data_state = ckpt.restore(start, abstract_with_shardings(abstract, state_sh))
        train_iter.set_state(data_state)
        print(f"resumed from the checkpoint at step {start}", flush=True)
    else:
        start, state = 0, jax.jit(init_fn, out_shardings=state_sh)(jax.random.key(cfg.seed))
        if cfg.init_from:
            state = state.replace(params=init_params_from(cfg.init_from, model, abstract.params, param_sh))
    eval_batches = spec.eval_batches(cfg.data, **data_args, num_batches=cfg.eval_batches) if cfg.eval_every else []

    # The loop.
    steps = spec.build_steps(tasks.StepContext(cfg, model, optimizer, loss_cfg, state_sh, param_sh, data_sh))
    steps = tasks.Steps(with_mesh(steps.train, mesh), with_mesh(steps.evaluate, mesh), steps.eval_row)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    loop = Loop(cfg, spec, steps, train_iter, eval_batches, data_sh, ckpt, writer, schedule,
                flops_per_token(model.config, cfg.seq_len), cfg.peak_flops_per_device or measure_peak_flops())
    state, loss = loop.run(state, start)
    ckpt.close()
    writer.close()
    if cfg.sample_prompt and tokenizer is not None and jax.process_index() == 0:
        print("\n--- sample from the trained model ---\n" + sample_text(
            model, jax.device_get(state.params), tokenizer, cfg.sample_prompt, cfg))
    return loss


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the progress bar says enough
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (UserError, FileNotFoundError) as e:  # anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
