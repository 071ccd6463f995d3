"""The demo: train a small Ling MoE on the Python standard library's source, on a laptop CPU, in minutes.

    python train.py --config configs/demo.py --workdir /tmp/ling_demo

A 2-layer, 16-expert Ling MoE; a 4096-piece SentencePiece tokenizer is trained
on the stdlib on the fly (kept in the workdir, so the workdir is a model with
its tokenizer); documents are fill-in-the-middle transformed at rate 0.2,
packed into 256-token rows and the rows shuffled in windows of 1024, 8 rows a
step for 740 steps.
The held-out loss is logged in nats per token and in bits per byte
(`eval_bits_per_byte`), which compares across tokenizers. At the end the model
completes three Python prompts, and the closing note says where the checkpoint,
TensorBoard logs and PNG report are and what to run next.
"""

import sysconfig

import ml_collections

from configs import default

# The prompts the finished model completes (the same for both recipes).
SAMPLE_PROMPTS = ("def fibonacci(n):\n    ", "class Stack:\n    def __init__(self):\n        ",
                  "import os\n\n\ndef list_files(path):\n    ")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo recipe; `arg="before"` gives the recipe it had before it was tuned (benchmarks/bench_demo.py)."""
    if arg not in (None, "", "before"):
        raise ValueError(f"configs/demo.py takes no argument or 'before'; got {arg!r}")
    c = before()
    if arg == "before":
        return c
    # Tuned for held-out bits per byte in the same wall time on 2 CPU cores (benchmarks/bench_demo.py; the
    # README's demo table). In about 1.4M training tokens a shallow model learns more per second and per step.
    c.model_overrides.update(dict(
        num_hidden_layers=2,  # 1 dense-first + 1 MoE layer: 4 layers learned less per step at this budget
        norm_head=False,  # a plain lm_head: NormHead's unit-norm columns keep a small model's logits flat for long
    ))
    c.data.fim_rate = 0.2  # enough FIM for `generate --fim`; the rest is plain left-to-right text
    c.data.row_shuffle_window = 1024  # a batch mixes many files, not consecutive rows of one long file
    c.batch_size = 8  # more, smaller steps: 2048 tokens per step
    c.steps = 740  # about the untuned recipe's wall time
    c.schedule.warmup_steps = 30
    c.schedule.decay_steps = 740
    c.loss.balance_loss_weight = 5e-2  # stronger balancing: 1e-2 let the router settle on 4 of the 16 experts
    c.checkpoint_every = 370
    c.eval_every = 370
    c.sample_temperature = 0.5
    return c


def before() -> ml_collections.ConfigDict:
    """The untuned recipe: a 4-layer, 16-expert Ling MoE (about 4M active parameters) on the stdlib."""
    c = default.get_config()
    c.model = "tiny"  # reshaped by the overrides below
    c.model_overrides.update(dict(
        hidden_size=256,  # D
        intermediate_size=768,  # the dense-first layer's ffn width
        moe_intermediate_size=128,  # expert ffn width
        num_hidden_layers=4,  # 1 dense-first + 3 MoE layers
        first_k_dense_replace=1,
        num_attention_heads=4,  # N
        num_key_value_heads=2,  # K
        head_dim=64,  # H
        num_experts=16,  # E
        num_experts_per_tok=4,  # top-k
        num_shared_experts=1,  # one shared expert MLP
        max_position_embeddings=1024,
        pad_token_id=0,  # the SentencePiece ids of train_sentencepiece
        bos_token_id=2,
        eos_token_id=3,
    ))
    c.tokenizer_vocab_size = 4096  # train a 4096-piece SentencePiece model on the data (sets vocab_size)
    c.tokenizer_max_documents = 800  # stdlib files used to train it
    c.data.kind = "text_dir"  # one document per file
    c.data.path = sysconfig.get_paths()["stdlib"]  # this interpreter's standard library
    c.data.file_pattern = "*.py"
    c.data.exclude = "site-packages/*,dist-packages/*,test/*,*/test/*,*/tests/*,idlelib/*"  # library code only
    c.data.fim_rate = 0.5  # fill-in-the-middle on half of the documents (PSM and SPM)
    c.data.add_eos = True
    c.data.eval_fraction = 0.02  # held-out files for the eval loss
    c.batch_size = 16  # sequences per step
    c.seq_len = 256  # tokens per packed row: 4096 tokens per step
    c.steps = 260
    c.schedule.peak_value = 3e-3  # warmup-cosine
    c.schedule.warmup_steps = 20
    c.schedule.decay_steps = 260
    c.schedule.end_value = 3e-4
    c.optimizer.weight_decay = 0.01
    c.loss.balance_loss_weight = 1e-2  # keep the 16 experts in use
    c.checkpoint_every = 130
    c.keep_checkpoints = 2
    c.log_every = 10
    c.eval_every = 130  # held-out loss, also in bits per byte (eval_bits_per_byte: tokenizers compare)
    c.eval_batches = 4
    c.sample_prompts = SAMPLE_PROMPTS  # completed at the end
    c.sample_tokens = 64
    c.sample_temperature = 0.6  # a little randomness keeps a small model from repeating itself
    c.sample_top_k = 20
    c.closing_note = True  # the PNG report, where the checkpoint and TensorBoard logs are, the next commands
    return c
