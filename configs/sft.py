"""Supervised fine-tuning with the Ling chat template, as for Ling-Coder-Lite's instruction model.

    python train.py --config configs/sft.py --workdir ~/runs/sft --config.init_from=~/ckpt/ling-coder-lite \
        --config.data.path=~/data/sft.jsonl --config.data.tokenizer=~/models/Ling-Coder-lite/tokenizer.json

The data is jsonl, one conversation per line: `{"messages": [{"role": "system" | "user" | "assistant",
"content": ...}, ...]}` or `{"prompt": ..., "response": ...}`. Conversations are rendered with the Ling chat
template (`ling_jax.data.chat`), packed whole into rows of `seq_len` tokens (first fit, segment ids keep them
apart), and the loss is on the assistant tokens only (each reply and its `<|endoftext|>`). The paper's recipe:
18.8M samples, cosine schedule with 100 warm-up steps, peak learning rate 4e-5, batch 384, packing. The model
architecture comes from `init_from` (a convert_weights.py output, a Hugging Face directory or a train.py
checkpoint); export the result with `convert_weights.py jax-to-hf --ckpt WORKDIR/checkpoints/STEP`.
"""

import ml_collections

from configs import default
from ling_jax.data.sft import default_post_training_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's SFT hyper-parameters; data paths and `init_from` come from the command line."""
    c = default.get_config(arg)
    c.task = "sft"  # chat conversations, loss on assistant tokens
    c.init_from = ""  # the converted base model to fine-tune (required in practice; "" = random init of c.model)
    c.compute_dtype = "bfloat16"  # activations and matmuls
    c.param_dtype = "float32"  # master weights and Adam moments
    c.data = default_post_training_data_config()  # jsonl records, chat template, truncation (ling_jax.data.sft)
    c.data.path = ""  # the SFT jsonl file, directory or glob
    c.data.tokenizer = ""  # the base model's tokenizer (.model or tokenizer.json); it must fit the vocabulary
    c.data.packing = "first_fit"  # whole conversations per row (the only SFT packing)
    c.data.truncation = "drop"  # conversations longer than seq_len: drop | truncate_right | truncate_left
    c.data.eval_fraction = 0.001  # held-out conversations for eval_loss (by a hash of the line index)
    c.batch_size = 384  # packed rows per step (paper: 384)
    c.seq_len = 8192  # tokens per packed row
    c.steps = 10_000  # set from the data: about samples per epoch * epochs / (batch_size * samples per row)
    c.schedule.kind = "warmup_cosine"
    c.schedule.init_value = 0.0  # linear warm-up from 0
    c.schedule.peak_value = 4e-5  # paper: 4e-5
    c.schedule.warmup_steps = 100  # paper: 100
    c.schedule.decay_steps = 10_000  # cosine to end_value by this step (keep equal to steps)
    c.schedule.end_value = 0.0  # cosine down to 0
    c.optimizer.weight_decay = 0.0  # no decay when fine-tuning
    c.loss.accumulation_steps = 1  # microbatches per step (raise to fit 384 rows in memory)
    c.checkpoint_every = 500  # steps between checkpoints
    c.keep_checkpoints = 3
    c.log_every = 10
    c.eval_every = 500  # held-out loss on assistant tokens
    c.eval_batches = 8
    c.sample_prompts = ("Write a Python function that checks whether a number is prime.",)  # chat turns at the end
    c.sample_tokens = 256
    return c
