"""Test helpers for grouped matmuls: random ragged cases, tolerances and checks against the one reference.

Used by ``tests/test_pallas_*.py`` and ``tests/test_grouped_matmul.py``. The
expected values come from `pallas_kernels.reference` run on float32 copies of
the inputs (exact for bfloat16) at the highest matmul precision, so the
oracle is as precise for a bfloat16 kernel as for a float32 one.

Seeds: `session_seed` returns ``$GMM_TEST_SEED`` when set, otherwise a fresh
random seed per process; tests put it in their failure messages so any
failure reproduces with ``GMM_TEST_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import types

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import gmm_reference, tgmm_reference

_SEED: int | None = None


def session_seed() -> int:
    """The seed of this test process (``$GMM_TEST_SEED`` or a fresh random one, fixed per process)."""
    global _SEED
    if _SEED is None:
        env = os.environ.get("GMM_TEST_SEED")
        _SEED = int(env) if env else secrets.randbelow(2**31)
        print(f"grouped-matmul tests: GMM_TEST_SEED={_SEED}")
    return _SEED


def rng_for(*key: int | str) -> np.random.Generator:
    """A generator derived from the session seed and a per-test key (reproducible per test)."""
    parts = [session_seed()] + [k if isinstance(k, int) else int.from_bytes(k.encode()[:8], "little")
                                for k in key]
    return np.random.default_rng(parts)


def _f32(x: jax.Array | np.ndarray) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def to_f64(x: jax.Array | np.ndarray) -> np.ndarray:
    """Exact float64 copy of a float32/bfloat16 array."""
    return np.asarray(_f32(x), np.float64)


def expected_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: np.ndarray, group_offset: int = 0,
                 transpose_rhs: bool = False) -> np.ndarray:
    """The reference ``gmm`` on float32 copies of the inputs, as float64."""
    out = gmm_reference(_f32(lhs), _f32(rhs), jnp.asarray(group_sizes, jnp.int32), group_offset,
                        transpose_rhs=transpose_rhs)
    return to_f64(out)


def expected_tgmm(lhs: jax.Array, dy: jax.Array, group_sizes: np.ndarray, group_offset: int = 0,
                  num_groups: int | None = None) -> np.ndarray:
    """The reference ``tgmm`` on float32 copies of the inputs, as float64."""
    out = tgmm_reference(_f32(lhs), _f32(dy), jnp.asarray(group_sizes, jnp.int32), group_offset,
                         num_groups=num_groups)
    return to_f64(out)


def rel_err(actual: jax.Array | np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` (absolute when ``expected`` is all zero); NaN -> inf."""
    a = to_f64(actual)
    if a.shape != expected.shape:
        raise AssertionError(f"shape {a.shape} != expected {expected.shape}")
    if not np.all(np.isfinite(a)):
        return float("inf")
    scale = float(np.max(np.abs(expected), initial=0.0))
    return float(np.max(np.abs(a - expected), initial=0.0)) / (scale if scale > 0 else 1.0)


def tolerance(dtype: jnp.dtype) -> float:
    """Relative error bound: 1e-5 for float32, 1e-2 for bfloat16."""
    return 1e-2 if jnp.dtype(dtype) == jnp.bfloat16 else 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    """One ragged grouped-matmul problem."""

    name: str
    m: int
    k: int
    n: int
    group_sizes: np.ndarray
    group_offset: int
    num_local: int

    def __str__(self) -> str:
        return (f"{self.name}: m={self.m} k={self.k} n={self.n} sizes={self.group_sizes.tolist()} "
                f"offset={self.group_offset} local={self.num_local}")

    def arrays(self, rng: np.random.Generator, dtype: jnp.dtype,
               transpose_rhs: bool = False) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``lhs [m, k]``, local ``rhs``, ``dy [m, n]`` and int32 ``group_sizes``."""
        w_shape = (self.num_local, self.n, self.k) if transpose_rhs else (self.num_local, self.k, self.n)
        lhs = jnp.asarray(rng.standard_normal((self.m, self.k), np.float32), dtype)
        rhs = jnp.asarray(rng.standard_normal(w_shape, np.float32), dtype)
        dy = jnp.asarray(rng.standard_normal((self.m, self.n), np.float32), dtype)
        return lhs, rhs, dy, jnp.asarray(self.group_sizes, jnp.int32)


def random_sizes(rng: np.random.Generator, m: int, groups: int, *, total: int | None = None,
                 empty_frac: float = 0.3) -> np.ndarray:
    """Random group sizes summing to ``total`` (default: a random value in ``[m/2, m]``),
    with about ``empty_frac`` of the groups forced empty."""
    if total is None:
        total = int(rng.integers(m // 2, m + 1))
    live = rng.random(groups) >= empty_frac
    if not live.any():
        live[rng.integers(groups)] = True
    sizes = np.zeros(groups, np.int64)
    idx = np.flatnonzero(live)
    sizes[idx] = rng.multinomial(total, rng.dirichlet(np.ones(len(idx))))
    return sizes.astype(np.int32)


def standard_cases(rng: np.random.Generator, m: int, k: int, n: int, groups: int) -> list[Case]:
    """Random sizes (with empty groups and a ragged tail), all rows in one group, all groups
    empty, a group offset with local groups, and full coverage (``sum == m``)."""
    off = int(rng.integers(1, groups))
    local = int(rng.integers(1, groups - off + 1))
    one = np.zeros(groups, np.int32)
    one[int(rng.integers(groups))] = m
    return [
        Case("random", m, k, n, random_sizes(rng, m, groups), 0, groups),
        Case("one_group", m, k, n, one, 0, groups),
        Case("all_empty", m, k, n, np.zeros(groups, np.int32), 0, groups),
        Case("offset", m, k, n, random_sizes(rng, m, groups, empty_frac=0.2), off, local),
        Case("full", m, k, n, random_sizes(rng, m, groups, total=m, empty_frac=0.2), 0, groups),
    ]


def local_rows(case: Case) -> np.ndarray:
    """Boolean ``[m]``: rows that belong to a local group."""
    ends = np.cumsum(np.asarray(case.group_sizes, np.int64))
    rows = np.arange(case.m)
    lo = ends[case.group_offset] - case.group_sizes[case.group_offset]
    hi = ends[case.group_offset + case.num_local - 1]
    return (rows >= lo) & (rows < hi)


def check_gmm(out: jax.Array, case: Case, lhs: jax.Array, rhs: jax.Array, dtype: jnp.dtype,
              transpose_rhs: bool = False, what: str = "gmm") -> None:
    """Asserts ``out`` matches the reference ``gmm`` within `tolerance` and is exactly 0 off the local rows."""
    expected = expected_gmm(lhs, rhs, case.group_sizes, case.group_offset, transpose_rhs)
    err = rel_err(out, expected)
    msg = f"{what} [{case}] dtype={jnp.dtype(dtype).name} seed={session_seed()}"
    assert err < tolerance(dtype), f"{msg}: relative error {err:.3g}"
    off = ~local_rows(case)
    assert np.all(to_f64(out)[off] == 0.0), f"{msg}: rows outside the local groups are not zero"


def check_tgmm(out: jax.Array, case: Case, lhs: jax.Array, dy: jax.Array, dtype: jnp.dtype,
               what: str = "tgmm") -> None:
    """Asserts ``out`` matches the reference ``tgmm`` within `tolerance` (empty groups exactly 0)."""
    expected = expected_tgmm(lhs, dy, case.group_sizes, case.group_offset, case.num_local)
    err = rel_err(out, expected)
    msg = f"{what} [{case}] dtype={jnp.dtype(dtype).name} seed={session_seed()}"
    assert err < tolerance(dtype), f"{msg}: relative error {err:.3g}"
    sizes = case.group_sizes[case.group_offset:case.group_offset + case.num_local]
    assert np.all(to_f64(out)[sizes == 0] == 0.0), f"{msg}: empty groups are not zero"


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One backend's kernel module and the tiling its tests use (tests parametrize over these)."""

    name: str
    module: types.ModuleType
    tiling: tuple[int, int, int]
