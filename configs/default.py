"""Defaults shared by every run recipe; not a run of its own (the recipes start from it).

    python train.py --config configs/default.py --workdir /tmp/ling_default   # tiny model, synthetic data
"""

import dataclasses

import ml_collections

from ling_jax.config import LingConfig
from ling_jax.data.pipeline import default_data_config
from ling_jax.train.optim import default_optimizer_config, default_schedule_config

_TYPES = {"int": int, "int | None": int, "float": float, "bool": bool, "str": str}


def model_overrides() -> ml_collections.ConfigDict:
    """One unset (None) placeholder per architecture field of `LingConfig`, settable from the command line."""
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(LingConfig):
        if f.type in _TYPES:
            c[f.name] = ml_collections.config_dict.placeholder(_TYPES[f.type])
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Every field of a run, commented. `arg` is unused."""
    del arg
    c = ml_collections.ConfigDict()
    c.task = "pretrain"  # train.tasks.Task: pretrain (documents) | sft (chat, configs/sft.py) | dpo (configs/dpo.py)
    c.model = "tiny"  # a zoo preset (ling_jax.list_models()); unused with init_from (its config.json is used)
    c.model_overrides = model_overrides()  # LingConfig fields to change, e.g. num_hidden_layers=4 (None: preset's)
    c.compute_dtype = "float32"  # DType: "float32" or "bfloat16" (activations and matmuls)
    c.param_dtype = "float32"  # DType of the master weights and optimizer state
    c.attention_impl = "auto"  # AttentionImpl: auto, xla, cudnn, splash
    c.gmm_impl = "auto"  # GmmImpl of the MoE grouped matmul: auto, pallas, xla, ragged_dot, reference
    c.remat = "none"  # Remat per decoder layer: none, full, dots
    # where training starts: a convert_weights.py output, a Hugging Face directory, a train.py checkpoint step
    # (WORKDIR/checkpoints/N) or workdir (its latest step); "" = random init. Its config.json sets the
    # architecture (model_overrides may change only what keeps the parameter shapes). DPO: also the reference.
    c.init_from = ""
    c.seed = 0  # params init, data order, FIM and sampling
    c.steps = 100  # optimizer steps in total (a resumed run continues to this)
    c.batch_size = 8  # global batch in sequences (all processes together)
    c.seq_len = 128  # tokens per sequence (packed)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))  # device mesh; -1 = the rest
    c.optimizer = default_optimizer_config()  # AdamW and clipping (ling_jax.train.optim)
    c.schedule = default_schedule_config()  # learning-rate schedule (ling_jax.train.optim)
    c.schedule.warmup_steps = 10
    c.schedule.decay_steps = 100
    c.loss = ml_collections.ConfigDict(dict(
        z_loss_weight=0.0,  # output z-loss weight
        balance_loss_weight=0.0,  # MoE Switch-style load-balance loss weight
        accumulation_steps=1,  # microbatches per step (batch_size must divide by it)
        bias_update_rate=0.0,  # aux-loss-free balancing: expert_bias step per optimizer step (ling_jax.train.balancing)
    ))
    c.data = default_data_config()  # source, tokenizer, FIM and packing (ling_jax.data; sft / dpo: ling_jax.data.sft)
    # Stages of the run (ling_jax.data.stages; configs/pretrain_ling_coder_lite.py, configs/demo_stages.py): a list
    # of dicts with name, steps or tokens, mixture ({source path: weight} over data.sources) and schedule (its
    # learning-rate phases). The mixture switches at each boundary; [] = one stage, config.schedule.
    c.stages = []
    c.dpo = ml_collections.ConfigDict(dict(
        beta=0.1,  # DPO temperature: strength of the pull towards the reference model (task=dpo)
        label_smoothing=0.0,  # assumed rate of flipped preference labels (conservative DPO; 0 = plain DPO)
        reference_dtype="",  # dtype of the frozen reference weights: "float32" | "bfloat16"; "" = param_dtype
    ))
    c.tokenizer_vocab_size = 0  # > 0 and no data.tokenizer: train a SentencePiece model of this size on the data
    c.tokenizer_max_documents = 2000  # documents read to train that tokenizer
    c.checkpoint_every = 50  # steps between checkpoints (and one at the end)
    c.keep_checkpoints = 3  # how many checkpoints to keep
    c.log_every = 10  # steps between metrics.jsonl / TensorBoard rows
    c.eval_every = 0  # steps between held-out evaluations; 0 = none
    c.eval_batches = 4  # held-out batches per evaluation
    c.eval = ml_collections.ConfigDict(dict(
        # code benchmarks executed at each evaluation step, comma-separated (ling_jax.evaluation): humaneval,
        # humaneval_infill_single, humaneval_infill_multi, jsonl:PATH; logged as eval/<task>_pass@1 (greedy)
        code_tasks="",
        code_limit=20,  # the first N problems of each code task per evaluation (None = all)
    ))
    c.compile_only = False  # compile the train step for config.mesh, print the compiler's memory per device, exit
    c.compile_topology = ""  # with compile_only: a TPU topology to compile for from this host (v5p:2x2x2); "" = ours
    c.peak_flops_per_device = 0.0  # MFU denominator in FLOP/s; 0 = measure a dense f32 matmul at start
    c.sample_prompts = ()  # at the end, print a completion of each of these prompts (one batch; () = none)
    c.sample_tokens = 64  # tokens to generate for that completion
    c.sample_temperature = 0.0  # 0 = greedy
    c.sample_top_k = 0  # sample among the k most likely tokens (0 = all)
    return c
