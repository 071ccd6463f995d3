"""`python convert_weights.py hf-to-jax|jax-to-hf ...`: the command of `ling_jax.cli.convert` (see its docstring)."""

import sys

from ling_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
