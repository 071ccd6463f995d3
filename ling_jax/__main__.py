"""`python -m ling_jax`: print the model zoo with parameter counts (no memory allocated)."""

import argparse

from ling_jax.zoo import zoo_table


def main() -> None:
    argparse.ArgumentParser(
        prog="python -m ling_jax",
        description="Print the ling_jax model zoo with total and active parameter counts.",
    ).parse_args()
    print(zoo_table())


if __name__ == "__main__":
    main()
