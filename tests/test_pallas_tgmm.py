"""`pallas_kernels.tgmm_tpu` (Mosaic TPU) and `tgmm_gpu` (Triton GPU) weight-gradient kernels, interpreted on CPU.

Against the one pure-jnp reference (`pallas_kernels.reference`, on float32
copies of the inputs) and upstream megablox's ``tgmm``: random sizes (seed printed; rerun with ``GMM_TEST_SEED``), empty
groups (must come out exactly zero), one group, a ragged tail whose rows must
not contribute, ``group_offset``/``num_groups``, f32 and bf16. Also lowers to
Mosaic for TPU and Triton IR for CUDA at Ling-lite shapes.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pallas_testing as testing
import pytest

from pallas_kernels import tgmm_gpu, tgmm_tpu

megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
DTYPES = [jnp.float32, jnp.bfloat16]


KERNELS = [testing.Kernel("tgmm_tpu", tgmm_tpu, (16, 128, 128)), testing.Kernel("tgmm_gpu", tgmm_gpu, (16, 64, 64))]
on_each_backend = pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)


@on_each_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_cases_against_the_reference(kernel: testing.Kernel, dtype: jnp.dtype) -> None:
    rng = testing.rng_for(kernel.name, jnp.dtype(dtype).name)
    m = int(rng.integers(40, 90))
    for case in testing.standard_cases(rng, m=m, k=200, n=160, groups=int(rng.integers(3, 7))):
        lhs, _, dy, sizes = case.arrays(rng, dtype)
        out = kernel.module.tgmm(
            lhs, dy, sizes, case.group_offset, num_groups=case.num_local, tiling=kernel.tiling, interpret=True
        )
        assert out.shape == (case.num_local, 200, 160) and out.dtype == dtype
        testing.check_tgmm(out, case, lhs, dy, dtype)


@on_each_backend
def test_garbage_in_unowned_rows_does_not_leak(kernel: testing.Kernel) -> None:
    rng = testing.rng_for(kernel.name + "_nan")
    case = testing.Case("nan_tail", 48, 128, 128, np.array([5, 0, 20, 3], np.int32), 1, 2)
    lhs, _, dy, sizes = case.arrays(rng, jnp.float32)
    rows = testing.local_rows(case)
    lhs = jnp.where(jnp.asarray(rows)[:, None], lhs, jnp.nan)  # Rows of no local group are NaN.
    dy = jnp.where(jnp.asarray(rows)[:, None], dy, jnp.inf)
    out = kernel.module.tgmm(lhs, dy, sizes, 1, num_groups=2, tiling=kernel.tiling, interpret=True)
    clean = (jnp.where(jnp.asarray(rows)[:, None], lhs, 0), jnp.where(jnp.asarray(rows)[:, None], dy, 0))
    testing.check_tgmm(out, case, *clean, jnp.float32)


@on_each_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_default_tiling(kernel: testing.Kernel, dtype: jnp.dtype) -> None:
    rng = testing.rng_for(kernel.name + "_default", jnp.dtype(dtype).name)
    case = testing.Case("default", 150, 96, 80, testing.random_sizes(rng, 150, 5), 0, 5)
    lhs, _, dy, sizes = case.arrays(rng, dtype)
    out = kernel.module.tgmm(lhs, dy, sizes, interpret=True)
    testing.check_tgmm(out, case, lhs, dy, dtype)


@on_each_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_against_megablox(kernel: testing.Kernel, dtype: jnp.dtype) -> None:
    rng = testing.rng_for(kernel.name + "_megablox", jnp.dtype(dtype).name)
    groups = 6
    for offset, local in ((0, groups), (2, 3)):
        case = testing.Case("megablox", 64, 256, 128, testing.random_sizes(rng, 64, groups), offset, local)
        lhs, _, dy, sizes = case.arrays(rng, dtype)
        ours = kernel.module.tgmm(lhs, dy, sizes, offset, num_groups=local, tiling=kernel.tiling, interpret=True)
        theirs = megablox.tgmm(
            lhs.T,
            dy,
            sizes,
            preferred_element_type=dtype,
            tiling=(16, 128, 128),
            group_offset=jnp.int32(offset),
            num_actual_groups=local,
            interpret=True,
        )
        err = testing.rel_err(ours, testing.to_f64(theirs))
        assert err < testing.tolerance(dtype), f"[{case}] vs megablox: {err:.3g} seed={testing.session_seed()}"


@on_each_backend
def test_rejects_bad_shapes(kernel: testing.Kernel) -> None:
    with pytest.raises(ValueError, match="tgmm needs"):
        kernel.module.tgmm(jnp.zeros((8, 16)), jnp.zeros((9, 4)), jnp.array([4, 4]), interpret=True)
    with pytest.raises(ValueError, match="num_groups"):
        kernel.module.tgmm(jnp.zeros((8, 16)), jnp.zeros((8, 4)), jnp.array([4, 4]), num_groups=3, interpret=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_lowers_to_mosaic_at_ling_lite_shapes(dtype: jnp.dtype) -> None:
    s = jax.ShapeDtypeStruct
    exp = jax.export.export(jax.jit(tgmm_tpu.tgmm), platforms=["tpu"])(
        s((6144, 2048), dtype), s((6144, 1408), dtype), s((64,), jnp.int32)
    )
    assert "tpu_custom_call" in exp.mlir_module()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_lowers_to_triton_at_ling_lite_shapes(dtype: jnp.dtype) -> None:
    s = jax.ShapeDtypeStruct
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    exp = jax.export.export(jax.jit(tgmm_gpu.tgmm), platforms=["cuda"], disabled_checks=[triton])(
        s((6144, 2048), dtype), s((6144, 1408), dtype), s((64,), jnp.int32)
    )
    assert "__gpu$xla.gpu.triton" in exp.mlir_module()
