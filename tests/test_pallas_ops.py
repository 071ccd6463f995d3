"""`pallas_kernels.gmm` / `pallas_kernels.tgmm`: backend switch and the custom_vjp (interpret mode on CPU).

Gradients w.r.t. lhs and rhs for both backends against the reference
(``dlhs = dy @ W_g^T`` on the local rows, 0 elsewhere; ``dW_g = x_g^T dy_g``)
and against upstream megablox's differentiable ``gmm``; random sizes (seed
printed; rerun with ``GMM_TEST_SEED``), empty groups, a ragged tail,
``group_offset``, ``transpose_rhs``, f32 and bf16, under ``jax.jit``.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pallas_testing as testing
import pytest

import pallas_kernels
from pallas_kernels import Backend, common

megablox_ops = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.ops")
TILING = {Backend.TPU: (16, 128, 128), Backend.GPU: (16, 64, 64)}


def _grads(backend: Backend, case: testing.Case, lhs: jax.Array, rhs: jax.Array, dy: jax.Array,
           sizes: jax.Array, transpose_rhs: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    def f(x: jax.Array, w: jax.Array) -> jax.Array:
        return pallas_kernels.gmm(x, w, sizes, case.group_offset, transpose_rhs=transpose_rhs,
                                  tiling=TILING[backend], backend=backend, interpret=True)

    out, vjp = jax.vjp(f, lhs, rhs)
    return (out, *jax.jit(vjp)(dy))


@pytest.mark.parametrize("backend", list(Backend), ids=lambda b: b.value)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gradients_against_the_reference(backend: Backend, dtype: jnp.dtype) -> None:
    rng = testing.rng_for("ops_grad", backend.value, jnp.dtype(dtype).name)
    groups = int(rng.integers(3, 7))
    offset = int(rng.integers(0, groups - 1))
    case = testing.Case("grad", int(rng.integers(40, 80)), 144, 96,
                        testing.random_sizes(rng, 80, groups, total=int(rng.integers(20, 40))),
                        offset, groups - offset - int(rng.integers(0, 2)))
    lhs, rhs, dy, sizes = case.arrays(rng, dtype)
    out, dlhs, drhs = _grads(backend, case, lhs, rhs, dy, sizes)
    assert dlhs.dtype == lhs.dtype and drhs.dtype == rhs.dtype and drhs.shape == rhs.shape
    testing.check_gmm(out, case, lhs, rhs, dtype, what=f"{backend.value} forward")
    # dlhs = dy @ rhs[l]^T on the local rows, zero elsewhere: a gmm with the transposed weight.
    dlhs_case = testing.Case("dlhs", case.m, case.n, case.k, case.group_sizes, offset, case.num_local)
    testing.check_gmm(dlhs, dlhs_case, dy, rhs, dtype, transpose_rhs=True, what=f"{backend.value} dlhs")
    testing.check_tgmm(drhs, case, lhs, dy, dtype, what=f"{backend.value} drhs")


@pytest.mark.parametrize("backend", list(Backend), ids=lambda b: b.value)
def test_gradients_with_transposed_rhs(backend: Backend) -> None:
    rng = testing.rng_for("ops_grad_t", backend.value)
    case = testing.Case("grad_t", 56, 80, 112, testing.random_sizes(rng, 56, 4), 0, 4)
    lhs, rhs_t, dy, sizes = case.arrays(rng, jnp.float32, transpose_rhs=True)
    out, dlhs, drhs_t = _grads(backend, case, lhs, rhs_t, dy, sizes, transpose_rhs=True)
    testing.check_gmm(out, case, lhs, rhs_t, jnp.float32, transpose_rhs=True)
    dlhs_case = testing.Case("dlhs", case.m, case.n, case.k, case.group_sizes, 0, 4)
    testing.check_gmm(dlhs, dlhs_case, dy, rhs_t.transpose(0, 2, 1), jnp.float32, transpose_rhs=True)
    drhs_case = testing.Case("drhs", case.m, case.n, case.k, case.group_sizes, 0, 4)
    testing.check_tgmm(drhs_t, drhs_case, dy, lhs, jnp.float32)


@pytest.mark.parametrize("backend", list(Backend), ids=lambda b: b.value)
def test_gradients_against_megablox(backend: Backend) -> None:
    rng = testing.rng_for("ops_megablox", backend.value)
    case = testing.Case("megablox", 64, 128, 128, testing.random_sizes(rng, 64, 5, total=64), 0, 5)
    lhs, rhs, dy, sizes = case.arrays(rng, jnp.float32)
    _, dlhs, drhs = _grads(backend, case, lhs, rhs, dy, sizes)

    def theirs(x: jax.Array, w: jax.Array) -> jax.Array:
        return megablox_ops.gmm(x, w, sizes, jnp.float32, (16, 128, 128), None, None, False, True)

    _, vjp = jax.vjp(theirs, lhs, rhs)
    m_dlhs, m_drhs = vjp(dy)
    assert testing.rel_err(dlhs, testing.to_f64(m_dlhs)) < 1e-5
    assert testing.rel_err(drhs, testing.to_f64(m_drhs)) < 1e-5


def test_tgmm_entry_point_and_jit() -> None:
    rng = testing.rng_for("ops_tgmm")
    case = testing.Case("tgmm", 40, 64, 48, testing.random_sizes(rng, 40, 4), 1, 2)
    lhs, _, dy, sizes = case.arrays(rng, jnp.float32)
    for backend in ("tpu", "gpu"):
        f = jax.jit(lambda x, d, s, b=backend: pallas_kernels.tgmm(
            x, d, s, 1, num_groups=2, tiling=(16, 64, 64) if b == "gpu" else None,
            backend=b, interpret=True))
        testing.check_tgmm(f(lhs, dy, sizes), case, lhs, dy, jnp.float32, what=backend)


def test_backend_resolution() -> None:
    assert common.resolve_backend("tpu") is Backend.TPU
    assert common.resolve_backend("GPU") is Backend.GPU
    assert common.resolve_backend("cuda") is Backend.GPU
    assert common.resolve_backend(Backend.GPU) is Backend.GPU
    expected = Backend.GPU if jax.default_backend() in ("gpu", "cuda", "rocm") else Backend.TPU
    assert common.resolve_backend(None) is expected
    with pytest.raises(ValueError):
        common.resolve_backend("metal")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only guard")
def test_cpu_requires_interpret() -> None:
    x = jnp.ones((8, 16))
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_kernels.gmm(x, jnp.ones((1, 16, 8)), jnp.array([8]))


def test_schedules_cover_every_row_once() -> None:
    """Schedule invariants over many random sizes (cheap: no kernel runs)."""
    rng = testing.rng_for("ops_sched")
    for m, tm, groups, local in ((50, 16, 5, 5), (50, 16, 5, 2), (7, 8, 3, 1), (64, 8, 1, 1)):
        row = jax.jit(common.row_gmm_schedule, static_argnums=(2, 3, 4))
        aligned = jax.jit(common.aligned_gmm_schedule, static_argnums=(2, 3, 4))
        for _ in range(15):
            sizes = testing.random_sizes(rng, m, groups, total=int(rng.integers(0, m + 1)))
            off = int(rng.integers(0, groups - local + 1))
            gs, go = jnp.asarray(sizes), jnp.int32(off)
            # GPU: every row written exactly once.
            r = jax.tree.map(np.asarray, row(gs, go, local, m, tm))
            hits = np.zeros(m, int)
            for row0, lo, hi in zip(r.row0, r.lo, r.hi, strict=True):
                rows = np.arange(row0, row0 + tm)
                hits[rows[(rows >= lo) & (rows < hi)]] += 1
            assert np.all(hits == 1), (sizes, off, local, m, tm)
            # TPU gmm: every row tile visited, visits of one tile consecutive.
            a = jax.tree.map(np.asarray, aligned(gs, go, local, m, tm))
            tiles = a.tile[: int(a.num_visits)]
            assert set(tiles.tolist()) == set(range(-(-m // tm))), (sizes, off, local, m, tm)
            assert np.all(np.diff(tiles) >= 0) and int(a.num_visits) <= len(a.tile)
