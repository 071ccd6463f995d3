"""`python -m ling_jax.report RUN_DIR`: plot a training run's metrics (loss, learning rate, expert load, code scores).

The same as `python -m ling_jax.cli.report`; see `ling_jax.cli.report`.
"""

from ling_jax.cli.report import main

if __name__ == "__main__":
    raise SystemExit(main())
