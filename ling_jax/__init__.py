"""ling_jax: the Ling MoE language models in JAX/Flax.

The package is layered; each folder imports only from the folders below it:

    cli                                    command lines (python -m ling_jax.cli.*)
    train, inference                       train / eval steps, tasks, checkpoints; generation
    io, data                               checkpoints and conversion; Grain pipelines, tokenizers
    model                                  Flax modules, MoE, grouped matmul, sharding rules
    config, zoo                            the architecture dataclass, runtime enums, presets

This module is the public API on top of them.
"""

from ling_jax.config import AttentionImpl, ConfigError, DType, Exchange, GmmImpl, LingConfig, Remat, ScoreFunction
from ling_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    TokenizerKind,
    load_tokenizer,
    train_sentencepiece,
)
from ling_jax.inference.completion import complete
from ling_jax.inference.decoding import generate
from ling_jax.io.convert import convert_hf_to_orbax, convert_orbax_to_hf
from ling_jax.io.hf_names import CheckpointError, from_hf_state_dict, to_hf_state_dict
from ling_jax.io.loading import from_pretrained
from ling_jax.io.orbax_params import is_converted_checkpoint, restore_params
from ling_jax.model.attention import ModelMode
from ling_jax.model.grouped_matmul import grouped_matmul
from ling_jax.model.kv_cache import KVCache, init_cache
from ling_jax.model.params import abstract_params, count_params, init_params, logical_axes
from ling_jax.model.transformer import LingForCausalLM
from ling_jax.train.losses import causal_lm_loss
from ling_jax.zoo import get_config, list_models

__all__ = [
    "AttentionImpl",
    "CheckpointError",
    "ConfigError",
    "DType",
    "Exchange",
    "GmmImpl",
    "HFTokenizer",
    "KVCache",
    "LingConfig",
    "LingForCausalLM",
    "ModelMode",
    "Remat",
    "ScoreFunction",
    "SentencePieceTokenizer",
    "Tokenizer",
    "TokenizerError",
    "TokenizerKind",
    "abstract_params",
    "causal_lm_loss",
    "complete",
    "convert_hf_to_orbax",
    "convert_orbax_to_hf",
    "count_params",
    "from_hf_state_dict",
    "from_pretrained",
    "generate",
    "get_config",
    "grouped_matmul",
    "init_cache",
    "init_params",
    "is_converted_checkpoint",
    "list_models",
    "load_tokenizer",
    "logical_axes",
    "restore_params",
    "to_hf_state_dict",
    "train_sentencepiece",
]
