"""Trains a Ling MoE model.

    python train.py --config configs/demo.py --workdir /tmp/ling_demo [--config.KEY=VALUE ...]
    ling-train --config configs/demo.py --workdir /tmp/ling_demo     (the same, installed)

Reads top to bottom: config -> mesh -> abstract state -> shardings -> init or
restore -> loop. Starting again with the same --workdir resumes from the latest
checkpoint (params, optimizer, step and data position), bit-exactly.
Writes `metrics.jsonl`, TensorBoard events and `checkpoints/` in the workdir.
What differs per task (pre-training, SFT, DPO) is its `ling_jax.train.tasks.TaskSpec`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import time
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from ling_jax import evaluation
from ling_jax.cli import report
from ling_jax.command_line import parse_flags
from ling_jax.config import DType, UserError
from ling_jax.data import pipeline as data_lib
from ling_jax.data.mixture import needs_tokenizer
from ling_jax.data.tokenizer import load_tokenizer, train_sentencepiece
from ling_jax.inference.decoding import generate, left_pad
from ling_jax.io import hub, loading
from ling_jax.io.loading import TRAIN_CHECKPOINTS
from ling_jax.model.aot import hbm_bytes, tpu_topology
from ling_jax.model.params import init_params, logical_axes
from ling_jax.model.sharding import (
    abstract_with_shardings,
    batch_sharding,
    make_mesh,
    validate_config,
    validate_shardings,
    with_mesh,
)
from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train import distributed, run_config, tasks
from ling_jax.train.aot import compile_train_step
from ling_jax.train.checkpointing import Preemption, TrainCheckpointer
from ling_jax.train.metrics import MetricsWriter, flops_per_token, measure_peak_flops
from ling_jax.train.optim import make_optimizer, make_schedule
from ling_jax.train.step import LossConfig, TrainState, init_train_state, train_state_shardings
from ling_jax.zoo import get_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.")


class RunError(UserError):
    """A problem with the run that stops it with a message and a non-zero exit."""


def model_from_config(cfg: ml_collections.ConfigDict) -> LingForCausalLM:
    """The model: a zoo preset (or `init_from`'s config) with overrides, runtime choices and dtypes."""
    overrides = {k: v for k, v in cfg.model_overrides.items() if v is not None}
    runtime = dict(attention_impl=cfg.attention_impl, gmm_impl=cfg.gmm_impl, remat=cfg.remat)
    if cfg.init_from:  # the architecture of the checkpoint training starts from
        arch = loading.init_config(cfg.init_from).replace(**overrides, **runtime)
    else:
        if cfg.get("tokenizer_vocab_size"):
            overrides.setdefault("vocab_size", cfg.tokenizer_vocab_size)
        arch = get_config(cfg.model, **overrides, **runtime)
    return LingForCausalLM(arch, dtype=DType.parse(cfg.compute_dtype, "config.compute_dtype").jnp,
                                    param_dtype=DType.parse(cfg.param_dtype, "config.param_dtype").jnp)


def tokenizer_from_config(cfg: ml_collections.ConfigDict, workdir: str, vocab_size: int):
    """The data tokenizer: `data.tokenizer`, else `init_from`'s, else one trained on the data; kept in the workdir.

    Its files are copied into the workdir, so that the run's checkpoints are models with a tokenizer
    (`loading.CheckpointPath.tokenizer_dir`: generate, evaluation and jax-to-hf find it there).
    """
    if not needs_tokenizer(cfg.data):  # synthetic data (every source of a mixture synthetic) is token ids
        return None
    source = cfg.data.tokenizer
    if not source and cfg.init_from and not cfg.get("tokenizer_vocab_size"):
        init = loading.resolve_checkpoint(cfg.init_from, "config.init_from")
        source = init.tokenizer_dir if loading.has_tokenizer(init.tokenizer_dir) else ""
    if source:
        source = hub.local_path(source, "config.data.tokenizer", tokenizer_only=True)  # a Hub id: its snapshot
        tokenizer = load_tokenizer(source)
        if jax.process_index() == 0:
            loading.copy_tokenizer_files(os.path.expanduser(source), workdir)
    elif cfg.get("tokenizer_vocab_size"):
        tokenizer = _trained_tokenizer(cfg, os.path.join(workdir, "tokenizer.model"))
    else:
        raise RunError("set config.data.tokenizer (a tokenizer file or directory), config.init_from (a checkpoint "
                       "with a tokenizer) or config.tokenizer_vocab_size (train a SentencePiece model on the data)")
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
            train_sentencepiece(texts, path, cfg.tokenizer_vocab_size, user_defined_symbols=specials)
        distributed.barrier("tokenizer")
    return load_tokenizer(path)


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


@dataclasses.dataclass(frozen=True)
class Sample:
    """The end-of-run completions of `config.sample_prompts`, planned at start so that they cannot fail the run."""

    prompts: tuple[str, ...]
    ids: list[list[int]]  # each prompt's token ids (SFT / DPO: the prompt as a user turn of the chat template)
    stop: int | None  # the token that ends a completion
    tokens: int  # new tokens: config.sample_tokens, clamped to the positions the longest prompt leaves

    @classmethod
    def plan(cls, cfg: ml_collections.ConfigDict, spec: tasks.TaskSpec, tokenizer, max_len: int) -> Sample | None:
        """The samples to print at the end, or None (with the reason printed now) when there are none."""
        prompts = tuple(cfg.sample_prompts)
        if not prompts or tokenizer is None or not cfg.sample_tokens:
            return None
        planned = [tasks.sample_prompt(spec, cfg, tokenizer, prompt) for prompt in prompts]
        longest = max(len(ids) for ids, _ in planned)
        tokens = min(cfg.sample_tokens, max_len - longest)
        if tokens < 1:
            print(f"note: no end-of-run sample: the longest of config.sample_prompts is {longest} tokens, and the "
                  f"model has {max_len} positions", flush=True)
            return None
        if tokens < cfg.sample_tokens:
            print(f"note: the end-of-run samples will have {tokens} new tokens, not config.sample_tokens="
                  f"{cfg.sample_tokens}: the longest prompt's {longest} tokens leave {tokens} of the model's "
                  f"{max_len} positions", flush=True)
        return cls(prompts, [ids for ids, _ in planned], planned[0][1], tokens)

    def texts(self, model, params, tokenizer, cfg: ml_collections.ConfigDict) -> list[str]:
        """Each prompt and its completion (one left-padded batch, sampled with the config's temperature and
        top-k)."""
        inputs, mask = left_pad(self.ids, tokenizer.padding_id)  # [B, T]
        width = inputs.shape[1]
        out = generate(model, params, jnp.asarray(inputs), attention_mask=jnp.asarray(mask),
                       max_new_tokens=self.tokens, temperature=cfg.sample_temperature,
                       top_k=cfg.sample_top_k or None, eos_token_id=self.stop if self.stop is not None else -1,
                       rng=jax.random.key(cfg.seed))
        texts = []
        for prompt, row in zip(self.prompts, np.asarray(out)[:, width:], strict=True):
            new = [int(t) for t in row]
            new = new[: new.index(self.stop)] if self.stop in new else new
            texts.append(prompt + tokenizer.decode_generated(new))
        return texts

    def show(self, model, params, tokenizer, cfg: ml_collections.ConfigDict) -> None:
        """Prints the samples; a failure is reported and does not fail the run (its checkpoint is committed)."""
        try:
            texts = self.texts(model, params, tokenizer, cfg)
            print("\n--- sample from the trained model ---\n" + "\n\n".join(texts), flush=True)
        except Exception:  # optional end-of-run work must not turn a finished run into a failure
            traceback.print_exc()
            print("note: the end-of-run sample failed (above); training and its last checkpoint are complete",
                  file=sys.stderr)


def code_eval_from_config(cfg: ml_collections.ConfigDict, model, tokenizer) -> Any:
    """`params -> {"eval/<task>_pass@1": score}` for `config.eval.code_tasks`, or None when there are none.

    The tasks are loaded now, so that a bad task name or file stops the run before training.
    """
    names = [t.strip() for t in cfg.eval.get("code_tasks", "").split(",") if t.strip()] if "eval" in cfg else []
    if not names:
        return None
    if tokenizer is None:
        raise RunError(f"config.eval.code_tasks={cfg.eval.code_tasks!r} needs a tokenizer, and synthetic data has "
                       "none: train on text (config.data.kind) or drop the code tasks")
    limit = cfg.eval.code_limit
    evaluation.load_tasks(names, limit)

    def scores(params) -> dict[str, float]:
        found = evaluation.code_scores(model, jax.device_get(params), tokenizer, names, limit)
        return {f"eval/{k}": v for k, v in found.items()}

    return scores


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
    preemption: Preemption
    code_eval: Any = None  # params -> code scores at evaluation steps (`code_eval_from_config`), or None
    stage_starts: dict[int, str] = dataclasses.field(default_factory=dict)  # first step -> stage (config.stages)
    eval_bytes: int = 0  # UTF-8 bytes of the held-out targets (`eval_text_bytes`); 0 = no bits-per-byte metric

    def run(self, state: TrainState, start: int) -> tuple[TrainState, float, bool]:
        """Steps `start + 1 .. cfg.steps`: train, log, evaluate, checkpoint.

        Returns the state, the last loss and whether the run stopped early on preemption (after saving and
        committing a checkpoint of the step it had finished).
        """
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
        loss, tokens, t_last = float("nan"), 0.0, time.perf_counter()
        for step in range(start + 1, cfg.steps + 1):
            state, metrics = self.steps.train(state, global_batch(next(self.train_iter), self.data_sh))
            tokens += cfg.batch_size * cfg.seq_len * self.spec.sequences_per_row
            stop = self.preemption.should_stop(step)
            save = stop or step % cfg.checkpoint_every == 0 or step == cfg.steps
            log = step % cfg.log_every == 0 or step == cfg.steps or step in self.stage_starts  # boundaries logged
            if log or save:  # never checkpoint a state that has gone non-finite
                metrics = jax.device_get(metrics)
                loss = self._check_finite(metrics, step)
            if log:
                elapsed, t_last = time.perf_counter() - t_last, time.perf_counter()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / elapsed:,.0f}")
                self._log(step, metrics, tokens / elapsed)
                tokens = 0.0
            if (self.eval_batches or self.code_eval) and step % cfg.eval_every == 0:
                self._evaluate(step, state.params)
            if save:
                self.ckpt.save(step, state, self.train_iter.get_state())
            bar.update(1)
            if stop:
                self.ckpt.wait()
                bar.close()
                print(f"preempted: stopped after step {step}; its checkpoint is committed and the same command "
                      "resumes from it", flush=True)
                return state, loss, True
        bar.close()
        return state, loss, False

    def _evaluate(self, step: int, params: Any) -> None:
        """The held-out loss and the code scores at `step`, as one metrics row."""
        row = {}
        if self.eval_batches:
            sums = [jax.device_get(self.steps.evaluate(params, global_batch(b, self.data_sh)))
                    for b in self.eval_batches]
            row.update(self.steps.eval_row(sums))
            if self.eval_bytes and "eval_loss" in row:  # nats per token -> bits per byte: tokenizers compare
                tokens = sum(float(s["tokens"]) for s in sums)
                row["eval_bits_per_byte"] = row["eval_loss"] * tokens / (math.log(2) * self.eval_bytes)
        if self.code_eval:
            row.update(self.code_eval(params))
        self.writer.write(step, row)

    def _check_finite(self, metrics: dict[str, Any], step: int) -> float:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (np.isfinite(loss) and np.isfinite(grad_norm)):
            self.ckpt.wait()
            raise RunError(f"loss is {loss} (grad norm {grad_norm}) at step {step}; stopping. The last good "
                           f"checkpoint (step {self.ckpt.latest_step()}) is kept; lower the learning rate or "
                           "check the data")
        return loss

    def _log(self, step: int, metrics: dict[str, Any], tokens_per_second: float) -> None:
        row = {k: v for k, v in metrics.items() if k != "tokens"}
        if step in self.stage_starts:  # the first step of a stage marks its boundary (the report draws it)
            row["stage"] = self.stage_starts[step]
        row.update(learning_rate=float(self.schedule(step - 1)), tokens_per_second=tokens_per_second,
                   mfu=tokens_per_second * self.flops_per_token / (self.peak_flops * jax.device_count()),
                   **tasks.data_stats(self.train_iter))
        self.writer.write(step, row)


def eval_text_bytes(eval_batches: list[dict[str, np.ndarray]], tokenizer, spec: tasks.TaskSpec) -> int:
    """The UTF-8 bytes of the text the held-out target tokens stand for (0 without a tokenizer, or for DPO)."""
    if tokenizer is None or not eval_batches or spec.sequences_per_row != 1:
        return 0
    table = tokenizer.token_bytes()
    targets = np.concatenate([np.ravel(b["targets"]) for b in eval_batches])
    targets = targets[(targets >= 0) & (targets < len(table))]
    return int(table[targets].sum())


def compile_only(cfg: ml_collections.ConfigDict, model: LingForCausalLM) -> None:
    """`config.compile_only`: the run's train step compiled for its mesh (of `compile_topology` TPU devices, or
    of this host's devices) and the compiler's memory per device, printed; nothing is trained or written."""
    devices = tpu_topology(cfg.compile_topology) if cfg.compile_topology else jax.devices()
    mesh = make_mesh(dict(cfg.mesh), devices=devices)
    optimizer = make_optimizer(cfg.optimizer, make_schedule(tasks.schedule_config(cfg)))
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
    run_config.validate(cfg, jax.process_count())  # every field, before any compute
    spec = tasks.task_spec(cfg)
    model = model_from_config(cfg)
    if cfg.get("compile_only"):
        compile_only(cfg, model)
        return float("nan")
    os.makedirs(workdir, exist_ok=True)
    tokenizer = tokenizer_from_config(cfg, workdir, model.config.vocab_size)
    sample = Sample.plan(cfg, spec, tokenizer, model.config.max_position_embeddings)
    code_eval = code_eval_from_config(cfg, model, tokenizer)
    data_args = dict(tokenizer=tokenizer, seq_len=cfg.seq_len, batch_size=cfg.batch_size // jax.process_count(),
                     seed=cfg.seed)

    # Mesh, optimizer, abstract state and shardings.
    mesh = make_mesh(dict(cfg.mesh))
    schedule = make_schedule(tasks.schedule_config(cfg))
    optimizer = make_optimizer(cfg.optimizer, schedule)
    loss_cfg = LossConfig(**dict(cfg.loss))
    init_fn = lambda rng: init_train_state(init_params(model, rng), optimizer)  # noqa: E731
    abstract = jax.eval_shape(init_fn, jax.random.key(cfg.seed))
    param_specs = logical_axes(model)
    state_sh, param_sh = train_state_shardings(abstract, param_specs, mesh)
    data_sh = batch_sharding(mesh)
    validate_config(model.config, mesh, batch_size=cfg.batch_size // loss_cfg.accumulation_steps)  # before compiling
    validate_shardings(abstract.params, param_specs, mesh)

    # Init or restore.
    ckpt = TrainCheckpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints, config=model.config)
    train_iter = tasks.train_iterator(spec, cfg, **data_args, process_index=jax.process_index(),
                                      process_count=jax.process_count())  # one source, or the staged mixture
    restored = ckpt.restore_latest(abstract_with_shardings(abstract, state_sh))  # damaged steps moved aside
    if restored is not None:
        start, state, data_state = restored
        train_iter.set_state(data_state)
        print(f"resumed from the checkpoint at step {start}", flush=True)
    else:
        start, state = 0, jax.jit(init_fn, out_shardings=state_sh)(jax.random.key(cfg.seed))
        if cfg.init_from:
            state = state.replace(params=init_params_from(cfg.init_from, model, abstract.params, param_sh))
    evaluates = run_config.evaluates(cfg, start)  # held-out data is read only when an evaluation will run
    eval_batches = tasks.eval_batches(spec, cfg, **data_args, num_batches=cfg.eval_batches) if evaluates else []

    # The loop.
    steps = spec.build_steps(tasks.StepContext(cfg, model, optimizer, loss_cfg, state_sh, param_sh, data_sh))
    steps = tasks.Steps(with_mesh(steps.train, mesh), with_mesh(steps.evaluate, mesh), steps.eval_row)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    with Preemption(ckpt) as preemption:
        loop = Loop(cfg, spec, steps, train_iter, eval_batches, data_sh, ckpt, writer, schedule,
                    flops_per_token(model.config, cfg.seq_len), cfg.peak_flops_per_device or measure_peak_flops(),
                    preemption, code_eval, tasks.stage_starts(cfg), eval_text_bytes(eval_batches, tokenizer, spec))
        try:
            state, loss, preempted = loop.run(state, start)
        finally:  # on success and on error alike, a save in flight is committed (nothing is lost)
            ckpt.close()  # the last checkpoint is committed before any optional end-of-run work
            writer.close()
    if sample is not None and not preempted and jax.process_index() == 0:
        sample.show(model, jax.device_get(state.params), tokenizer, cfg)
    if cfg.get("closing_note", False) and not preempted and jax.process_index() == 0:
        closing_note(workdir, ckpt.latest_step(), cfg)
    return loss


def closing_note(workdir: str, step: int | None, cfg: ml_collections.ConfigDict) -> None:
    """`config.closing_note`: the run's PNG report, then where its outputs are and the commands to try next.

    The report is optional work: a failure is reported and does not fail the finished run.
    """
    png = os.path.join(workdir, report.DEFAULT_OUT)
    try:
        report.plot_report(report.read_metrics(pathlib.Path(workdir)), pathlib.Path(png), os.path.basename(workdir))
    except Exception as e:
        png = f"(not written: {e})"
    prompts = tuple(cfg.get("sample_prompts") or ())
    prompt = (prompts[0] if prompts else "def fibonacci(n):").split("\n")[0]
    top_k = cfg.get("sample_top_k", 20)  # the run's own sampling settings, as its end-of-run samples used
    sampling = f"--temperature {cfg.get('sample_temperature', 0.6):g}" + (f" --top-k {top_k}" if top_k else "")
    print(f"""
--- the run is a model: {workdir} ---
checkpoint   {os.path.join(workdir, TRAIN_CHECKPOINTS, str(step))} (tokenizer and config with it)
TensorBoard  tensorboard --logdir {os.path.join(workdir, "tensorboard")}
report       {png}
next:
  python -m ling_jax.cli.generate --model {workdir} --prompt {prompt!r} --max-new-tokens 64 {sampling}
  python -m ling_jax.evaluation --model {workdir} --tasks humaneval --limit 20 --out {workdir}/eval
  python convert_weights.py jax-to-hf --ckpt {workdir} --out {workdir}/hf""", flush=True)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the progress bar says enough
    if len(argv) > 1 or _WORKDIR.value is None:
        problem = f"unexpected arguments {argv[1:]}" if len(argv) > 1 else "--workdir is required"
        print(f"error: {problem}; usage: python train.py --config configs/demo.py --workdir DIR "
              "[--config.KEY=VALUE ...]", file=sys.stderr)
        sys.exit(2)
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except (UserError, FileNotFoundError) as e:  # anything else is a bug and keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    """The command (`python train.py`, `ling-train`): absl flags, then `main`."""
    app.run(main, flags_parser=lambda argv: parse_flags(argv, _CONFIG, __doc__))


if __name__ == "__main__":
    entry()
