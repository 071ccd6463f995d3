"""`ling_jax.model.grouped_matmul`: the dispatcher (every `GmmImpl`) and the XLA CPU path, forward and gradients.

Everything is compared with the one reference (`pallas_kernels.reference`)
on random group sizes drawn fresh per run (seed printed; rerun with
``GMM_TEST_SEED``), with empty groups,
a ragged tail (rows past ``sum(group_sizes)`` must give exact zeros and zero
input gradient), one group holding every row, groups larger than the XLA
path's full chunk, and ``group_offset`` with local groups.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pallas_testing as testing
import pytest

from ling_jax.model.grouped_matmul import GmmImpl, _buckets, grouped_matmul, resolve_impl, tgmm_xla


@functools.cache
def _runner(impl: GmmImpl | str, offset: int | None) -> Callable[..., tuple[jax.Array, ...]]:
    """Jitted forward + VJP of one impl (cached, so equal shapes compile once)."""

    @jax.jit
    def run(x: jax.Array, w: jax.Array, s: jax.Array, d: jax.Array) -> tuple[jax.Array, ...]:
        out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, s, impl=impl, group_offset=offset), x, w)
        return (out, *vjp(d))

    return run


def _fwd_and_grads(impl: GmmImpl | str, case: testing.Case, lhs: jax.Array, rhs: jax.Array,
                   dy: jax.Array, sizes: jax.Array) -> tuple[jax.Array, ...]:
    offset = case.group_offset if case.num_local < len(case.group_sizes) else None
    return _runner(impl, offset)(lhs, rhs, sizes, dy)


def _check_all(impl: GmmImpl | str, case: testing.Case, dtype: jnp.dtype, rng: np.random.Generator) -> None:
    lhs, rhs, dy, sizes = case.arrays(rng, dtype)
    out, dlhs, drhs = _fwd_and_grads(impl, case, lhs, rhs, dy, sizes)
    name = GmmImpl(impl).value
    assert out.dtype == dtype and dlhs.dtype == dtype and drhs.dtype == dtype
    testing.check_gmm(out, case, lhs, rhs, dtype, what=f"{name} forward")
    dlhs_case = testing.Case(case.name, case.m, case.n, case.k, case.group_sizes, case.group_offset,
                             case.num_local)
    testing.check_gmm(dlhs, dlhs_case, dy, rhs, dtype, transpose_rhs=True, what=f"{name} dlhs")
    testing.check_tgmm(drhs, case, lhs, dy, dtype, what=f"{name} drhs")


@pytest.mark.parametrize("impl", list(GmmImpl), ids=lambda i: i.value)
def test_every_impl_forward_and_grad(impl: GmmImpl) -> None:
    rng = testing.rng_for("dispatch", impl.value)
    groups = int(rng.integers(3, 7))
    case = testing.Case("random", int(rng.integers(30, 70)), 48, 40,
                        testing.random_sizes(rng, 30, groups), 0, groups)
    _check_all(impl.value if impl in (GmmImpl.XLA, GmmImpl.AUTO) else impl, case, jnp.float32, rng)


@pytest.mark.parametrize("impl", [GmmImpl.XLA, GmmImpl.RAGGED_DOT, GmmImpl.REFERENCE, GmmImpl.PALLAS],
                         ids=lambda i: i.value)
def test_every_impl_with_group_offset(impl: GmmImpl) -> None:
    rng = testing.rng_for("dispatch_offset", impl.value)
    case = testing.Case("offset", 60, 48, 40, testing.random_sizes(rng, 60, 6, empty_frac=0.2), 2, 3)
    _check_all(impl, case, jnp.float32, rng)


@pytest.mark.parametrize("impl", [GmmImpl.XLA, GmmImpl.PALLAS], ids=lambda i: i.value)
def test_bfloat16(impl: GmmImpl) -> None:
    rng = testing.rng_for("dispatch_bf16", impl.value)
    case = testing.Case("bf16", 64, 64, 48, testing.random_sizes(rng, 64, 5), 0, 5)
    _check_all(impl, case, jnp.bfloat16, rng)


def test_xla_path_edge_cases() -> None:
    """Fixed shapes (one compile); sizes cover the full-chunk loop, the last rows and empty groups."""
    rng = testing.rng_for("xla_edges")
    m, groups = 700, 5
    layouts = {
        "one_group_all_rows": np.array([0, 0, m, 0, 0]),
        "big_groups": np.array([300, 0, 257, 143, 0]),  # > 256 rows: full chunks plus a remainder.
        "exact_chunks": np.array([256, 256, 0, 0, 188]),
        "tiny_groups_then_tail": np.array([1, 2, 3, 0, 9]),
        "all_empty": np.zeros(groups),
    }
    for _ in range(2):
        layouts[f"random_{len(layouts)}"] = testing.random_sizes(rng, m, groups, empty_frac=0.2)
    for name, sizes in layouts.items():
        case = testing.Case(name, m, 24, 20, np.asarray(sizes, np.int32), 0, groups)
        _check_all(GmmImpl.XLA, case, jnp.float32, rng)


@pytest.mark.parametrize("m", [1, 5, 13])
def test_xla_path_fewer_rows_than_a_bucket(m: int) -> None:
    rng = testing.rng_for("xla_small", m)
    case = testing.Case("small", m, 16, 8, testing.random_sizes(rng, m, 3, empty_frac=0.0), 0, 3)
    _check_all(GmmImpl.XLA, case, jnp.float32, rng)


def test_tgmm_xla_with_offset() -> None:
    rng = testing.rng_for("tgmm_xla")
    case = testing.Case("tgmm", 300, 32, 24, testing.random_sizes(rng, 300, 7), 3, 4)
    lhs, _, dy, sizes = case.arrays(rng, jnp.float32)
    out = jax.jit(lambda x, d, s: tgmm_xla(x, d, s, 3, num_groups=4))(lhs, dy, sizes)
    testing.check_tgmm(out, case, lhs, dy, jnp.float32)


def test_xla_path_does_not_use_ragged_dot() -> None:
    x, w, s = jnp.ones((32, 8)), jnp.ones((4, 8, 8)), jnp.array([8, 8, 8, 8])
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: grouped_matmul(a, b, s, impl="xla").sum(), (0, 1)))(x, w)
    assert "ragged_dot" not in str(jaxpr)


def test_buckets_bound_the_padding() -> None:
    for m in (1, 7, 8, 100, 255, 256, 6144):
        b = _buckets(m)
        assert list(b) == sorted(set(b)) and b[-1] == min(256, m) and all(0 < c <= m for c in b)
        for rows in range(1, b[-1] + 1):
            c = next(c for c in b if c >= rows)
            assert c - rows < max(8, rows // 8 + 1), (m, rows, c)


def test_dispatch_rules_and_errors() -> None:
    assert resolve_impl("auto") is (GmmImpl.XLA if jax.default_backend() == "cpu" else GmmImpl.PALLAS)
    assert resolve_impl("ragged_dot") is GmmImpl.RAGGED_DOT
    with pytest.raises(ValueError):
        resolve_impl("cublas")
    x, w = jnp.ones((8, 4)), jnp.ones((2, 4, 3))
    with pytest.raises(ValueError, match="lhs"):
        grouped_matmul(x, jnp.ones((2, 5, 3)), jnp.array([4, 4]))
    with pytest.raises(ValueError, match="group_offset"):
        grouped_matmul(x, w, jnp.array([2, 2, 4]))
    assert grouped_matmul(x, w, jnp.array([2, 2, 4]), group_offset=1).shape == (8, 3)
