"""`ling_jax.model.experts`: routing, the sort by expert, the SwiGLU experts and the float32 combine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.config import GmmImpl
from ling_jax.model.experts import combine, local_dispatch, permute, routed_ffn, swiglu_experts, unpermute
from ling_jax.model.routing import route


def test_route_renormalises_top_k():
    logits = jnp.log(jnp.asarray([[0.1, 0.6, 0.2, 0.1]]))
    probs, w, e = route(logits, 2, normalize=True)
    np.testing.assert_allclose(probs, [[0.1, 0.6, 0.2, 0.1]], rtol=1e-6)
    np.testing.assert_array_equal(e, [[1, 2]])
    np.testing.assert_allclose(w, [[0.75, 0.25]], rtol=1e-6)
    _, w_raw, _ = route(logits, 2, normalize=False)
    np.testing.assert_allclose(w_raw, [[0.6, 0.2]], rtol=1e-6)
    _, w_one, _ = route(logits, 1, normalize=True)  # k = 1 is never renormalised
    np.testing.assert_allclose(w_one, [[0.6]], rtol=1e-6)


def test_permute_sorts_by_expert_and_unpermute_inverts():
    x = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3)
    experts = jnp.asarray([[2, 0], [1, 2], [0, 3], [2, 1], [3, 0]])
    rows, sizes, order = permute(x, experts, 4)
    np.testing.assert_array_equal(sizes, [3, 2, 3, 2])
    flat = np.asarray(experts).reshape(-1)[np.asarray(order)]
    assert (np.diff(flat) >= 0).all()
    back = unpermute(rows, order, 2)
    np.testing.assert_array_equal(back, np.repeat(np.asarray(x)[:, None], 2, axis=1))


def _silu(a: np.ndarray) -> np.ndarray:
    return a / (1 + np.exp(-a))


def _weights(E: int = 3, D: int = 6, F: int = 4):
    kg, ku, kd = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kg, (E, D, F)), jax.random.normal(ku, (E, D, F)), jax.random.normal(kd, (E, F, D)))


def test_swiglu_experts_is_each_experts_mlp_on_its_rows():
    wg, wu, wd = _weights()
    rows = jax.random.normal(jax.random.key(1), (8, 6))
    sizes = jnp.asarray([3, 0, 4], jnp.int32)  # row 7 belongs to no expert
    out = np.asarray(swiglu_experts(rows, wg, wu, wd, sizes, GmmImpl.REFERENCE))
    r, g, u, d = (np.asarray(a, np.float64) for a in (rows, wg, wu, wd))
    for e, (lo, hi) in enumerate(((0, 3), (3, 3), (3, 7))):
        expected = (_silu(r[lo:hi] @ g[e]) * (r[lo:hi] @ u[e])) @ d[e]
        np.testing.assert_allclose(out[lo:hi], expected, rtol=1e-5, atol=1e-5)
    assert not np.any(out[7])


def test_combine_sums_the_slots_in_float32():
    out = jnp.asarray([[[1.0, 2.0], [3.0, 4.0]]], jnp.bfloat16)  # [X=1, k=2, D=2]
    y = combine(out, jnp.asarray([[0.25, 0.75]]))
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, [[2.5, 3.5]])


@pytest.mark.parametrize("impl", [GmmImpl.XLA, GmmImpl.REFERENCE])
def test_routed_ffn_with_a_dispatch_that_pads_the_rows(impl):
    """A dispatch may hand the grouped matmuls a longer buffer: rows past the sizes give zeros, `back` trims."""
    wg, wu, wd = _weights()
    x = jax.random.normal(jax.random.key(2), (5, 6))
    _, weights, experts = route(jax.random.normal(jax.random.key(3), (5, 3)), 2, True)

    def padded(rows: jax.Array, counts: jax.Array):
        return jnp.pad(rows, ((0, 7), (0, 0)), constant_values=jnp.nan), counts, lambda out: out[:rows.shape[0]]

    plain = routed_ffn(x, weights, experts, wg, wu, wd, num_experts=3, impl=impl, dispatch=local_dispatch)
    via = routed_ffn(x, weights, experts, wg, wu, wd, num_experts=3, impl=impl, dispatch=padded)
    assert plain.dtype == jnp.float32 and plain.shape == (5, 6)
    np.testing.assert_array_equal(via, plain)
    r, g, u, d = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    expected = [sum(float(weights[i, j]) * ((_silu(r[i] @ g[e]) * (r[i] @ u[e])) @ d[e])
                    for j, e in enumerate(np.asarray(experts[i]))) for i in range(5)]
    np.testing.assert_allclose(plain, np.stack(expected), rtol=1e-5, atol=1e-5)


def test_sparse_decode_path_matches_routed_ffn_and_takes_int8_experts():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ling_jax.model.experts import routed_ffn, sparse_routed_ffn
    from ling_jax.model.quantization import quantize

    E, D, F, k = 8, 16, 12, 3
    keys = jax.random.split(jax.random.key(3), 4)
    wg, wu = (jax.random.normal(key, (E, D, F)) for key in keys[:2])
    wd = jax.random.normal(keys[2], (E, F, D))
    for X in (1, 6):  # one token; several tokens sharing experts
        x = jax.random.normal(keys[3], (X, D))
        _, weights, experts = route(x @ jnp.ones((D, E)) * jnp.arange(E) % 3, k, True)
        want = routed_ffn(x, weights, experts, wg, wu, wd, num_experts=E, impl="xla")
        got = jax.jit(sparse_routed_ffn)(x, weights, experts, wg, wu, wd)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
        q = [quantize(w, (-2,)) for w in (wg, wu, wd)]
        deq = [w.astype(jnp.float32) for w in q]
        np.testing.assert_allclose(np.asarray(sparse_routed_ffn(x, weights, experts, *q)),
                                   np.asarray(sparse_routed_ffn(x, weights, experts, *deq)), rtol=1e-6, atol=1e-5)
