"""The CPU throughput benchmark model, fixed so that numbers compare across changes.

    python train.py --config configs/bench_cpu.py --workdir /tmp/ling_bench_cpu

`benchmarks/bench_train.py` runs this config and reports tokens/s and MFU.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """vocab 8192, hidden 512, 4 layers (1 dense-first), 8/2 heads of 64, 16 experts top-4 + 2 shared."""
    c = default.get_config(arg)
    c.model = "tiny"  # the tiny preset, reshaped by the overrides below
    c.model_overrides.update(dict(
        vocab_size=8192,  # vocabulary
        hidden_size=512,  # D
        intermediate_size=1408,  # dense-layer ffn width
        moe_intermediate_size=256,  # expert ffn width
        num_hidden_layers=4,  # layers in total
        first_k_dense_replace=1,  # dense-first layers
        num_attention_heads=8,  # N
        num_key_value_heads=2,  # K
        head_dim=64,  # H
        num_experts=16,  # E
        num_experts_per_tok=4,  # top-k
        num_shared_experts=2,  # shared experts (one MLP of 2 x 256)
        max_position_embeddings=512,  # longest sequence
    ))
    c.batch_size = 4  # sequences per step
    c.seq_len = 512  # tokens per sequence: 2048 tokens per step
    c.steps = 30  # enough steps to time the steady state
    c.data.kind = "synthetic"  # random token documents
    c.data.vocab_size = 8192  # synthetic ids in [0, 8192)
    c.schedule.warmup_steps = 5  # short warmup
    c.schedule.decay_steps = 30  # cosine over the run
    c.log_every = 5  # a metrics row every 5 steps
    c.checkpoint_every = 1000  # checkpoint only at the end
    return c
