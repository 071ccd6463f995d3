"""Trains a Ling MoE model: the command of `ling_jax.cli.train` (installed: `ling-train`), read there.

    python train.py --config configs/demo.py --workdir /tmp/ling_demo [--config.KEY=VALUE ...]

`ling_jax/cli/train.py` reads top to bottom: config -> mesh -> abstract state -> shardings ->
init or restore -> loop. This file keeps the documented command and its names (`train.run`, ...).
"""

from ling_jax.cli.train import *  # noqa: F403  (train.run, train.RunError, ... for scripts and tests)
from ling_jax.cli.train import entry

if __name__ == "__main__":
    entry()
