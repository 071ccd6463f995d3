"""pass@k: the unbiased estimator against the closed form on hand-made tables."""

from __future__ import annotations

from math import comb

import pytest

from ling_jax.evaluation.pass_at_k import PassAtKError, check_ks, mean_pass_at_k, pass_at_k


def _closed(n: int, c: int, k: int) -> float:
    return 1.0 - comb(n - c, k) / comb(n, k)


def test_n10_c3_against_the_closed_form():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-12)  # c / n
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252, abs=1e-12)  # 1 - C(7,5)/C(10,5) = 0.91666...
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(10, 0, 1), (10, 10, 5), (10, 8, 5), (20, 1, 10), (200, 17, 100), (5, 2, 4)])
def test_table(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_closed(n, c, k), abs=1e-12)


def test_mean_over_problems():
    scores = mean_pass_at_k([(10, 3), (10, 0), (10, 10)], [1, 5])
    assert scores[1] == pytest.approx((0.3 + 0 + 1) / 3)
    assert scores[5] == pytest.approx((11 / 12 + 0 + 1) / 3)
    assert mean_pass_at_k([], [1]) == {1: 0.0}


def test_k_the_samples_cannot_support():
    with pytest.raises(PassAtKError, match="raise --n"):
        pass_at_k(3, 1, 5)
    with pytest.raises(PassAtKError, match="impossible"):
        pass_at_k(3, 4, 1)
    with pytest.raises(PassAtKError, match="--n 10 or more"):
        check_ks((1, 10), 5)
    check_ks((1, 5), 5)
