"""The real training step compiled ahead of time for a mesh, and the compiler's memory per device.

`compile_train_step` builds the abstract `TrainState` (`jax.eval_shape`, nothing
allocated), its shardings from the logical-axis rules, a sharded batch of
`ShapeDtypeStruct`s, and compiles `train_step` exactly as `train.py` jits it
(optimizer, accumulation, remat and loss weights of the run, state donated).
With a mesh of TPU topology devices (`ling_jax.model.aot.tpu_topology`) this is
the XLA:TPU program a pod would run, compiled on this host.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ling_jax.model.aot import CompiledProgram, MemoryUse, compile_abstract
from ling_jax.model.params import init_params, logical_axes
from ling_jax.model.sharding import abstract_with_shardings, batch_sharding, use_mesh, validate_config
from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train.step import BATCH_KEYS, LossConfig, init_train_state, train_state_shardings, train_step


def compile_train_step(model: LingForCausalLM, optimizer: optax.GradientTransformation, loss_cfg: LossConfig,
                       mesh: Mesh, *, batch_size: int, seq_len: int) -> CompiledProgram:
    """Compiles one optimizer step on a global batch of `batch_size` x `seq_len` tokens for `mesh`.

    Raises:
      ShardingError: the model or batch does not divide over the mesh (checked before tracing).
    """
    validate_config(model.config, mesh, batch_size=batch_size // loss_cfg.accumulation_steps)
    key = jax.random.key(0)  # made outside the mesh: its devices need not exist here
    start = time.perf_counter()
    with use_mesh(mesh):
        abstract = jax.eval_shape(lambda k: init_train_state(init_params(model, k), optimizer), key)
        state_sh, _ = train_state_shardings(abstract, logical_axes(model), mesh)
        tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=batch_sharding(mesh))
        step = functools.partial(train_step, model=model, optimizer=optimizer, loss_cfg=loss_cfg)
        compiled = compile_abstract(step, abstract_with_shardings(abstract, state_sh),
                                    {k: tokens for k in BATCH_KEYS}, out_shardings=(state_sh, None),
                                    donate_argnums=0)
    return CompiledProgram("train_step", MemoryUse.of(compiled), time.perf_counter() - start)
