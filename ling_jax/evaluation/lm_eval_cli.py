"""The `lm_eval` command line with the `ling_jax` model registered (lm-eval finds models only by import).

    python -m ling_jax.evaluation.lm_eval_cli run --model ling_jax --model_args pretrained=PATH,dtype=bfloat16 \\
        --tasks hellaswag [--include_path DIR] [--limit N]

takes exactly `lm_eval`'s arguments. From Python, pass the model object instead:
`lm_eval.simple_evaluate(model=LingJaxLM(pretrained=PATH), tasks=[...])`.
"""

from __future__ import annotations

import sys

import ling_jax.evaluation.lm_eval_model  # noqa: F401 - registers the `ling_jax` model


def main() -> None:
    """Runs lm-eval's own command line."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(main())
