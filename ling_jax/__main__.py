"""`python -m ling_jax`: print the model zoo with parameter counts (no memory allocated)."""

from ling_jax.cli.zoo import main

raise SystemExit(main())
