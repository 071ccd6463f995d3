"""Continued pre-training of Ling-Coder-lite as in the paper (NTP + FIM, 16M-token batches), for a TPU pod.

    python train.py --config configs/pretrain_ling_coder_lite.py:$PATHS --workdir /gcs/B/ling-coder-lite-cpt \
        --config.init_from=/gcs/B/ckpt/ling-coder-lite-base --config.data.tokenizer=/gcs/B/ckpt/ling-coder-lite-base

with the sources' paths set first:

    PATHS=raw=/gcs/B/code/raw,related=/gcs/B/code/related,synthetic=/gcs/B/code/syn,text=/gcs/B/text,math=/gcs/B/math

Run the same command on every host of the slice, with the bucket mounted at /gcs/B (docs/launch.md).
The mesh below is for a v5p-64 slice (32 chips): expert parallelism over 8, FSDP over 4.
Its memory per chip, from the planner (docs/scaling.md):

    python -m ling_jax.cli.plan --model ling_coder_lite --mesh fsdp=4,expert=8 --batch-tokens 16777216 \
        --seq-len 4096 --accumulation-steps 16 --remat full --compute-dtype bfloat16
"""

import ml_collections

from configs import default
from ling_jax.train.optim import paper_schedule_config

SOURCES = ("raw", "related", "synthetic", "text", "math")  # the names the config argument gives paths to


def _paths(arg: str | None) -> dict[str, str]:
    """`{source: path}` from the config argument `raw=PATH,related=PATH,...` (unknown names are an error)."""
    paths = dict(item.split("=", 1) for item in (arg or "").split(",") if "=" in item)
    unknown = sorted(set(paths) - set(SOURCES))
    if unknown:
        raise ValueError(f"configs/pretrain_ling_coder_lite.py:{arg}: unknown sources {unknown}; use {SOURCES}")
    return paths


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's recipe: 16M-token batches of 4K-token rows, NTP + FIM, the three stages of Table 1.

    `arg`: the sources' paths, `raw=PATH,related=PATH,synthetic=PATH,text=PATH,math=PATH`.
    """
    paths = _paths(arg)
    c = default.get_config(None)
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
    c.schedule = paper_schedule_config()  # kind=phases; the phases come from the stages below
    c.schedule.init_value = 0.0  # the warmup of stage 1 starts from 0
    c.stages = [
        dict(name="stage1", tokens=870e9,  # 51,856 steps: warmup, then multi-step constant 3e-4 -> 1.5e-4
             mixture={"code": 70, "text": 20, "math": 10, "code/raw": 94, "code/related": 5, "code/synthetic": 1},
             schedule=[dict(kind="linear", steps=2000, end=3e-4),
                       dict(kind="multistep", boundaries=[16_000, 33_000], values=[3e-4, 2.25e-4, 1.5e-4])]),
        dict(name="stage2", tokens=1.7e12,  # 101,328 steps: cosine 1.4e-4 -> 1.1e-4
             mixture={"code": 65, "text": 20, "math": 15, "code/raw": 75, "code/related": 20, "code/synthetic": 5},
             schedule=dict(kind="cosine", start=1.4e-4, end=1.1e-4)),
        dict(name="anneal", tokens=630e9,  # 37,551 steps: inverse square root 1.4e-4 -> 1.4e-6
             mixture={"code": 60, "text": 20, "math": 20, "code/raw": 40, "code/related": 10, "code/synthetic": 50},
             schedule=dict(kind="inverse_sqrt", start=1.4e-4, end=1.4e-6)),
    ]
    c.steps = 51_856 + 101_328 + 37_551  # the three stages: 3.2T tokens
    c.optimizer.weight_decay = 0.1  # AdamW decay (norms and biases excluded)
    c.optimizer.clip_norm = 1.0  # global-norm clipping
    c.data.kind = "array_record"  # every source: ling_jax.curation's ArrayRecord output (JSON records)
    c.data.record_format = "json"  # the document is the record's data.text_field
    source = lambda name, weight: dict(name=name, weight=weight, path=paths.get(name, ""))  # noqa: E731
    c.data.sources = [  # weights of stage 1 (each stage sets its own)
        dict(name="code", weight=70, sources=[source("raw", 94), source("related", 5), source("synthetic", 1)]),
        source("text", 20),
        source("math", 10),
    ]
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
