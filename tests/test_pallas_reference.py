"""`pallas_kernels.reference`, the oracle of every grouped-matmul test, against its definition.

Small integer-valued inputs, so every product and sum is exact in float32 and
the expected values (per-group slices multiplied in NumPy) must match exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.reference import gmm_reference, row_groups, tgmm_reference

# Global groups 0..3 own rows [0, 2), [2, 2), [2, 5), [5, 6); row 6 is past the sum.
SIZES = jnp.asarray([2, 0, 3, 1], jnp.int32)
OFFSET = 1  # local groups are global 1, 2, 3


def _ints(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-3, 4, shape).astype(np.float32)


def test_row_groups_with_an_offset():
    gid, valid = row_groups(SIZES, jnp.int32(OFFSET), 3, 7)
    np.testing.assert_array_equal(valid, [False, False, True, True, True, True, False])
    np.testing.assert_array_equal(np.asarray(gid)[np.asarray(valid)], [1, 1, 1, 2])


def test_gmm_reference_is_the_definition():
    lhs, rhs = _ints((7, 5), 0), _ints((3, 5, 4), 1)
    expected = np.zeros((7, 4), np.float32)
    expected[2:5] = lhs[2:5] @ rhs[1]  # global group 2 is local group 1
    expected[5:6] = lhs[5:6] @ rhs[2]
    out = gmm_reference(jnp.asarray(lhs), jnp.asarray(rhs), SIZES, OFFSET)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, expected)
    out_t = gmm_reference(jnp.asarray(lhs), jnp.asarray(rhs.transpose(0, 2, 1)), SIZES, OFFSET, transpose_rhs=True)
    np.testing.assert_array_equal(out_t, expected)
    out_bf16 = gmm_reference(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16), SIZES, OFFSET,
                             out_dtype=jnp.float32)
    assert out_bf16.dtype == jnp.float32
    np.testing.assert_array_equal(out_bf16, expected)  # small integers are exact in bfloat16


def test_tgmm_reference_is_the_definition_and_ignores_garbage_rows():
    lhs, dy = _ints((7, 5), 2), _ints((7, 4), 3)
    expected = np.stack([np.zeros((5, 4), np.float32), lhs[2:5].T @ dy[2:5], lhs[5:6].T @ dy[5:6]])
    unowned = np.asarray([True, True, False, False, False, False, True])[:, None]
    lhs_nan, dy_inf = np.where(unowned, np.nan, lhs), np.where(unowned, np.inf, dy)
    out = tgmm_reference(jnp.asarray(lhs_nan), jnp.asarray(dy_inf), SIZES, OFFSET, num_groups=3)
    assert out.shape == (3, 5, 4)
    np.testing.assert_array_equal(out, expected)  # local group 0 (global 1) is empty: exact zeros


def test_gmm_reference_gradients_are_dy_w_transposed_and_tgmm():
    lhs, rhs, dy = _ints((7, 5), 4), _ints((3, 5, 4), 5), _ints((7, 4), 6)
    f = lambda x, w: gmm_reference(x, w, SIZES, OFFSET)  # noqa: E731
    _, vjp = jax.vjp(f, jnp.asarray(lhs), jnp.asarray(rhs))
    dlhs, drhs = vjp(jnp.asarray(dy))
    np.testing.assert_array_equal(dlhs, gmm_reference(jnp.asarray(dy), jnp.asarray(rhs), SIZES, OFFSET,
                                                      transpose_rhs=True))
    np.testing.assert_array_equal(drhs, tgmm_reference(jnp.asarray(lhs), jnp.asarray(dy), SIZES, OFFSET,
                                                       num_groups=3))
    assert float(jnp.abs(drhs).sum()) > 0 and not np.any(np.asarray(dlhs)[[0, 1, 6]])
