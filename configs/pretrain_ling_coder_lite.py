"""Continued pre-training of Ling-Coder-lite as in the paper (NTP + FIM, 16M-token batches), for a TPU pod.

    python train.py --config configs/pretrain_ling_coder_lite.py --workdir /gcs/BUCKET/ling-coder-lite-cpt \
        --config.init_from=/gcs/BUCKET/ckpt/ling-coder-lite-base --config.data.path=/gcs/BUCKET/code/*.array_record

Run the same command on every host of the slice, with the bucket mounted at /gcs/BUCKET (docs/launch.md).
The mesh below is for a v5p-64 slice (32 chips): expert parallelism over 8, FSDP over 4.
Its memory per chip, from the planner (docs/scaling.md):

    python -m ling_jax.cli.plan --model ling_coder_lite --mesh fsdp=4,expert=8 --batch-tokens 16777216 \
        --seq-len 4096 --accumulation-steps 16 --remat full --compute-dtype bfloat16
"""

import ml_collections

from configs import default
from ling_jax.train.optim import paper_schedule_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's recipe: 16M-token batches of 4K-token rows, NTP + FIM, the staged schedule."""
    c = default.get_config(arg)
    c.model = "ling_coder_lite_base"  # start from the base model (init_from its converted weights)
    c.compute_dtype = "bfloat16"  # bf16 compute, f32 master weights
    c.param_dtype = "float32"
    c.remat = "full"  # recompute each layer in the backward pass (saved matmul outputs would not fit)
    c.seq_len = 4096  # tokens per row (packed)
    c.batch_size = 4096  # 4096 x 4096 = 16M tokens per step
    c.loss.accumulation_steps = 16  # 256 rows per microbatch: 66.7 of 95 GiB per chip (python -m ling_jax.cli.plan)
    c.loss.z_loss_weight = 1e-4  # keeps logits bounded in bf16
    c.loss.balance_loss_weight = 1e-3  # Switch-style balance of the 64 experts
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=4, expert=8, tensor=1))  # 32 chips
    c.schedule = paper_schedule_config()  # warmup, multi-step constant, cosine, inverse-sqrt annealing
    c.schedule.phases = [
        dict(kind="linear", steps=2000, end=3e-4),  # warmup
        dict(kind="multistep", steps=150_000, boundaries=[60_000, 110_000], values=[3e-4, 2e-4, 1.5e-4]),
        dict(kind="cosine", steps=40_000, end=3e-5),  # decay to the floor
        dict(kind="inverse_sqrt", steps=8000, end=1e-5),  # annealing on the highest-quality data
    ]
    c.steps = 200_000  # about 3.3T tokens
    c.optimizer.weight_decay = 0.1  # AdamW decay (norms and biases excluded)
    c.optimizer.clip_norm = 1.0  # global-norm clipping
    c.data.kind = "array_record"  # pre-tokenisation-free UTF-8 text records
    c.data.tokenizer = ""  # set with --config.data.tokenizer (the checkpoint's tokenizer.json)
    c.data.fim_rate = 0.5  # fill-in-the-middle on half of the documents
    c.data.fim_spm_rate = 0.5  # PSM and SPM equally
    c.data.worker_count = 8  # Grain reader processes per host
    c.data.eval_fraction = 0.001  # held-out documents
    c.checkpoint_every = 1000  # steps between checkpoints
    c.keep_checkpoints = 5
    c.log_every = 10
    c.eval_every = 1000
    c.eval_batches = 16
    c.peak_flops_per_device = 459e12  # TPU v5p bf16 peak per chip
    return c
