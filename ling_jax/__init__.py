"""ling_jax: the Ling MoE language models in JAX/Flax."""

from ling_jax.attention import ModelMode, init_cache
from ling_jax.checkpoint import (
    StorageDtype,
    convert_hf_to_orbax,
    convert_orbax_to_hf,
    is_converted_checkpoint,
    restore_params,
)
from ling_jax.config import AttentionImpl, ConfigError, LingConfig, Remat
from ling_jax.convert import CheckpointError, from_hf_state_dict, to_hf_state_dict
from ling_jax.decoding import generate
from ling_jax.grouped_matmul import GmmImpl, grouped_matmul
from ling_jax.model import LingForCausalLM, init_params, logical_axes
from ling_jax.pretrained import from_pretrained
from ling_jax.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    TokenizerKind,
    load_tokenizer,
    train_sentencepiece,
)
from ling_jax.zoo import count_params, get_config, list_models

__all__ = [
    "AttentionImpl",
    "CheckpointError",
    "ConfigError",
    "GmmImpl",
    "HFTokenizer",
    "LingConfig",
    "LingForCausalLM",
    "ModelMode",
    "Remat",
    "SentencePieceTokenizer",
    "StorageDtype",
    "Tokenizer",
    "TokenizerError",
    "TokenizerKind",
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
