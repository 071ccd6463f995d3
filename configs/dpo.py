"""Offline DPO (sigmoid loss, beta 0.1) from an SFT checkpoint, as for Ling-Coder-Lite's instruction model.

    python train.py --config configs/dpo.py --workdir ~/runs/dpo --config.init_from=~/runs/sft \
        --config.data.path=~/data/pairs.jsonl --config.data.tokenizer=~/models/Ling-Coder-lite/tokenizer.json

The data is jsonl, one preference pair per line: `{"prompt": ..., "chosen": ..., "rejected": ...}`, each a
string or a list of `{"role", "content"}` messages (see `ling_jax.data.dpo`), rendered with the Ling chat
template. The policy starts from `init_from` (here the SFT workdir: its latest checkpoint) and a frozen copy of
the same weights is the reference; its log-probabilities are computed in the same step (`ling_jax.train.dpo`).
Logged: `loss`, `rewards/chosen`, `rewards/rejected`, `rewards/accuracy`, `rewards/margin`, `logps/*`. The
paper's recipe: learning rate 3e-7, batch 192, cosine schedule with 150 warm-up steps. Export the policy with
`convert_weights.py jax-to-hf --ckpt WORKDIR/checkpoints/STEP`.
"""

import ml_collections

from configs import default
from ling_jax.data.sft import default_post_training_data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's DPO hyper-parameters; data paths and `init_from` come from the command line."""
    c = default.get_config(arg)
    c.task = "dpo"  # preference pairs against a frozen reference
    c.init_from = ""  # the SFT model (workdir, checkpoint step or converted directory); required
    c.compute_dtype = "bfloat16"  # activations and matmuls
    c.param_dtype = "float32"  # master weights and Adam moments
    c.dpo.beta = 0.1  # sigmoid DPO temperature (the public recipes)
    c.dpo.label_smoothing = 0.0  # plain DPO
    c.dpo.reference_dtype = "bfloat16"  # half the memory; the same numbers as the bf16 compute of the policy
    c.data = default_post_training_data_config()  # jsonl pairs, chat template, truncation (ling_jax.data.sft)
    c.data.path = ""  # the preference-pairs jsonl file, directory or glob
    c.data.tokenizer = ""  # the model's tokenizer (.model or tokenizer.json); it must fit the vocabulary
    c.data.truncation = "truncate_left"  # pairs longer than seq_len: drop | truncate_right | truncate_left
    c.data.eval_fraction = 0.01  # held-out pairs for eval_rewards/accuracy and eval_loss
    c.batch_size = 192  # pairs per step (paper: 192)
    c.seq_len = 4096  # tokens per row (prompt + response), one chosen and one rejected row per pair
    c.steps = 2000  # set from the data: pairs * epochs / batch_size
    c.schedule.kind = "warmup_cosine"
    c.schedule.init_value = 0.0  # linear warm-up from 0
    c.schedule.peak_value = 3e-7  # paper: 3e-7
    c.schedule.warmup_steps = 150  # paper: 150
    c.schedule.decay_steps = 2000  # cosine to end_value by this step (keep equal to steps)
    c.schedule.end_value = 0.0
    c.optimizer.weight_decay = 0.0  # no decay
    c.loss.accumulation_steps = 1  # microbatches of pairs per step (raise to fit in memory)
    c.checkpoint_every = 200  # steps between checkpoints
    c.keep_checkpoints = 3
    c.log_every = 10
    c.eval_every = 200  # held-out DPO loss and rewards
    c.eval_batches = 4
    c.sample_prompts = ("Write a Python function that checks whether a number is prime.",)  # chat turns at the end
    c.sample_tokens = 256
    return c
