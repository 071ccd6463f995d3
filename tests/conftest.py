"""Shared test fixtures: the golden checkpoint in ../shared/fixtures beside the checkout."""

from __future__ import annotations

import os
import pathlib

# The tests run on the CPU. With libtpu installed (the TPU compiler, for tests/test_tpu_compile.py), JAX would
# otherwise probe for TPU chips in every process and log the failure; abstract TPU topologies work either way.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

FIXTURE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ling-tiny-a"


@pytest.fixture(scope="session")
def fixture_dir() -> pathlib.Path:
    if not FIXTURE.exists():
        pytest.fail(f"golden fixtures not found at {FIXTURE}: check out ../shared beside the repository")
    return FIXTURE


@pytest.fixture(scope="session")
def golden(fixture_dir):
    return dict(np.load(fixture_dir / "golden.npz"))


@pytest.fixture(scope="session")
def golden_grads(fixture_dir):
    return dict(np.load(fixture_dir / "golden_grads.npz"))


@pytest.fixture(scope="session")
def tiny(fixture_dir):
    """(model, params) of the fixture checkpoint in float32."""
    import ling_jax

    return ling_jax.from_pretrained(str(fixture_dir))
