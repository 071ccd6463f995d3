"""The paper's three-stage data recipe (Table 1), scaled down: a mixture of stdlib-derived sources, on 2 CPU cores.

    python train.py --config configs/demo_stages.py --workdir /tmp/ling_demo_stages

Three top-level sources mixed by tokens, with code a group of three, as in the paper's table: code = raw
(the standard library's modules) + related (its tests) + synthetic (random walks over token ids), text (the
stdlib's .txt files) and math (decimal arithmetic test cases, *.decTest). Three stages switch the ratios and
the learning-rate phase: 70/20/10 and 94/5/1 (multi-step constant), 65/20/15 and 75/20/5 (cosine), 60/20/20
and 40/10/50 (inverse square root annealing). `metrics.jsonl` logs `data/share/<source>` against
`data/target/<source>`; `python -m ling_jax.cli.report /tmp/ling_demo_stages` marks the stage boundaries.
`configs/demo_stages.py:synthetic` makes every source synthetic (no tokenizer; the tests use it).
"""

import sysconfig

import ml_collections

from configs import demo

STDLIB = sysconfig.get_paths()["stdlib"]
LIBRARY_ONLY = "site-packages/*,dist-packages/*,test/*,*/test/*,*/tests/*,idlelib/*"


def _sources(synthetic: bool) -> list[dict]:
    """The mixture's sources (`data.sources`); `synthetic`: each a synthetic source of its own."""
    def src(name: str, weight: float, seed: int, **text) -> dict:
        if synthetic:
            return dict(name=name, weight=weight, kind="synthetic", synthetic_seed=seed, fim_rate=0.0)
        return dict(name=name, weight=weight, **text)

    return [
        dict(name="code", weight=70, sources=[
            src("raw", 94, 1, kind="text_dir", path=STDLIB, file_pattern="*.py", exclude=LIBRARY_ONLY),
            src("related", 5, 2, kind="text_dir", path=STDLIB + "/test", file_pattern="test_*.py", exclude=""),
            dict(name="synthetic", weight=1, kind="synthetic", synthetic_seed=3, fim_rate=0.0),
        ]),
        src("text", 20, 4, kind="text_dir", path=STDLIB, file_pattern="*.txt", exclude="site-packages/*"),
        src("math", 10, 5, kind="text_dir", path=STDLIB, file_pattern="*.decTest", exclude="site-packages/*"),
    ]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """configs/demo.py's model and batches on the staged mixture; `arg` "synthetic": synthetic sources only."""
    synthetic = arg == "synthetic"
    c = demo.get_config(None)
    c.data.sources = _sources(synthetic)  # weights here are stage 1's; each stage sets its own below
    c.data.synthetic_num_docs = 5000  # per synthetic source
    c.data.synthetic_max_len = 200  # synthetic documents of 2..200 tokens
    c.data.vocab_size = 512  # synthetic token ids in [0, 512)
    if synthetic:
        c.tokenizer_vocab_size = 0  # token ids only: no tokenizer
        c.model_overrides.vocab_size = 512
        c.sample_prompts = ()  # nothing to decode
        c.data.fim_rate = 0.0
    c.steps = 260  # the three stages below
    c.stages = [
        dict(name="stage1", steps=100,  # 70/20/10 and 94/5/1; warmup, then multi-step constant 3e-3 -> 1.5e-3
             mixture={"code": 70, "text": 20, "math": 10, "code/raw": 94, "code/related": 5, "code/synthetic": 1},
             schedule=[dict(kind="linear", steps=20, end=3e-3),
                       dict(kind="multistep", boundaries=[40], values=[3e-3, 1.5e-3])]),
        dict(name="stage2", steps=100,  # 65/20/15 and 75/20/5; cosine 1.4e-3 -> 1.1e-3
             mixture={"code": 65, "text": 20, "math": 15, "code/raw": 75, "code/related": 20, "code/synthetic": 5},
             schedule=dict(kind="cosine", start=1.4e-3, end=1.1e-3)),
        dict(name="anneal", steps=60,  # 60/20/20 and 40/10/50; inverse square root 1.4e-3 -> 1.4e-5
             mixture={"code": 60, "text": 20, "math": 20, "code/raw": 40, "code/related": 10, "code/synthetic": 50},
             schedule=dict(kind="inverse_sqrt", start=1.4e-3, end=1.4e-5)),
    ]
    c.checkpoint_every = 50
    c.eval_every = 100
    return c
