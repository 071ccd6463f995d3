"""`pallas_kernels.gmm_tpu` (Mosaic TPU) and `gmm_gpu` (Triton GPU) kernels, interpreted on CPU.

Checked against the one pure-jnp reference (`pallas_kernels.reference`, on
float32 copies of the inputs) and the upstream megablox kernel (an
independent implementation), over
random group sizes drawn fresh per run (seed printed; rerun with
``GMM_TEST_SEED``), empty groups, one group holding every row, a ragged tail,
``group_offset`` with local groups, tiles that do not divide m/k/n, f32 and
bf16. Also lowers the kernel to Mosaic for TPU and Triton IR for CUDA at Ling-lite shapes.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pallas_testing as testing
import pytest

from pallas_kernels import gmm_gpu, gmm_tpu

megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
DTYPES = [jnp.float32, jnp.bfloat16]


KERNELS = [testing.Kernel("gmm_tpu", gmm_tpu, (16, 128, 128)), testing.Kernel("gmm_gpu", gmm_gpu, (16, 64, 64))]
on_each_backend = pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)


@on_each_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_cases_against_the_reference(kernel: testing.Kernel, dtype: jnp.dtype) -> None:
    rng = testing.rng_for(kernel.name, jnp.dtype(dtype).name)
    m = int(rng.integers(40, 90))  # tm=16 rarely divides it; k=200 leaves a masked k tail.
    for case in testing.standard_cases(rng, m=m, k=200, n=160, groups=int(rng.integers(3, 7))):
        lhs, rhs, _, sizes = case.arrays(rng, dtype)
        out = kernel.module.gmm(lhs, rhs, sizes, case.group_offset, tiling=kernel.tiling, interpret=True)
        assert out.shape == (m, 160) and out.dtype == dtype
        testing.check_gmm(out, case, lhs, rhs, dtype)


@on_each_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_transpose_rhs_and_default_tiling(kernel: testing.Kernel, dtype: jnp.dtype) -> None:
    rng = testing.rng_for(kernel.name + "_t", jnp.dtype(dtype).name)
    case = testing.Case("transposed", 150, 96, 80, testing.random_sizes(rng, 150, 5), 1, 3)
    lhs, rhs_t, _, sizes = case.arrays(rng, dtype, transpose_rhs=True)
    out = kernel.module.gmm(lhs, rhs_t, sizes, case.group_offset, transpose_rhs=True, interpret=True)
    testing.check_gmm(out, case, lhs, rhs_t, dtype, transpose_rhs=True)


@on_each_backend
def test_float32_output_from_bf16_and_empty_grid_tail(kernel: testing.Kernel) -> None:
    rng = testing.rng_for(kernel.name + "_out")
    sizes = np.array([0, 7, 0, 0], np.int32)  # 7 of 64 rows used: tail tiles are zero-only visits.
    case = testing.Case("sparse", 64, 128, 128, sizes, 0, 4)
    lhs, rhs, _, gs = case.arrays(rng, jnp.bfloat16)
    out = kernel.module.gmm(lhs, rhs, gs, out_dtype=jnp.float32, tiling=kernel.tiling, interpret=True)
    assert out.dtype == jnp.float32
    testing.check_gmm(out, case, lhs, rhs, jnp.bfloat16)


@on_each_backend
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_against_megablox(kernel: testing.Kernel, dtype: jnp.dtype) -> None:
    rng = testing.rng_for(kernel.name + "_megablox", jnp.dtype(dtype).name)
    groups = 6
    for offset, local in ((0, groups), (2, 3)):
        case = testing.Case("megablox", 64, 256, 128, testing.random_sizes(rng, 64, groups), offset, local)
        lhs, rhs, _, sizes = case.arrays(rng, dtype)
        ours = kernel.module.gmm(lhs, rhs, sizes, offset, tiling=kernel.tiling, interpret=True)
        theirs = megablox.gmm(
            lhs,
            rhs,
            sizes,
            preferred_element_type=dtype,
            tiling=(16, 128, 128),
            group_offset=jnp.int32(offset),
            interpret=True,
        )
        rows = testing.local_rows(case)  # megablox leaves rows past sum(group_sizes) unwritten.
        expected = testing.to_f64(theirs)[rows]
        err = testing.rel_err(np.asarray(testing.to_f64(ours))[rows], expected)
        assert err < testing.tolerance(dtype), f"[{case}] vs megablox: {err:.3g} seed={testing.session_seed()}"


@on_each_backend
def test_rejects_unsupported_inputs(kernel: testing.Kernel) -> None:
    lhs = jnp.zeros((8, 16), jnp.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        kernel.module.gmm(lhs, jnp.zeros((2, 16, 8), jnp.float16), jnp.array([4, 4]), interpret=True)
    with pytest.raises(ValueError, match="contraction"):
        kernel.module.gmm(jnp.zeros((8, 16)), jnp.zeros((2, 8, 8)), jnp.array([4, 4]), interpret=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_lowers_to_mosaic_at_ling_lite_shapes(dtype: jnp.dtype) -> None:
    s = jax.ShapeDtypeStruct
    for transpose in (False, True):
        rhs = s((64, 1408, 2048) if transpose else (64, 2048, 1408), dtype)
        exp = jax.export.export(
            jax.jit(lambda x, w, g, t=transpose: gmm_tpu.gmm(x, w, g, transpose_rhs=t)), platforms=["tpu"]
        )(s((6144, 2048), dtype), rhs, s((64,), jnp.int32))
        assert "tpu_custom_call" in exp.mlir_module()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_lowers_to_triton_at_ling_lite_shapes(dtype: jnp.dtype) -> None:
    s = jax.ShapeDtypeStruct
    triton = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    for transpose in (False, True):
        rhs = s((64, 1408, 2048) if transpose else (64, 2048, 1408), dtype)
        exp = jax.export.export(
            jax.jit(lambda x, w, g, t=transpose: gmm_gpu.gmm(x, w, g, transpose_rhs=t)),
            platforms=["cuda"],
            disabled_checks=[triton],
        )(s((6144, 2048), dtype), rhs, s((64,), jnp.int32))
        assert "__gpu$xla.gpu.triton" in exp.mlir_module()
