"""`python -m ling_jax` (or `python -m ling_jax.cli.zoo`): the model zoo with parameter counts, no memory allocated."""

from __future__ import annotations

import argparse

from ling_jax.model.params import count_params
from ling_jax.zoo import get_config, list_models


def zoo_table() -> str:
    """A Markdown table of the presets with their total and active parameter counts."""
    rows = ["| name | layers | hidden | heads / kv | experts (top-k) + shared | total | active |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in list_models():
        c = get_config(name)
        total, active = count_params(c)
        rows.append(f"| {name} | {c.num_hidden_layers} | {c.hidden_size} | "
                    f"{c.num_attention_heads} / {c.num_key_value_heads} | {c.num_experts} "
                    f"({c.num_experts_per_tok}) + {c.num_shared_experts} | {_human(total)} | {_human(active)} |")
    return "\n".join(rows)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m ling_jax",
        description="Print the ling_jax model zoo with total and active parameter counts.",
    ).parse_args(argv)
    print(zoo_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
