"""pass@k by the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

With n samples of a problem of which c pass, the probability that at least one of k samples drawn
without replacement passes is `1 - C(n - c, k) / C(n, k)`, computed as the stable product
`1 - prod_{i = n - c + 1}^{n} (1 - k / i)`. A benchmark's pass@k is the mean over its problems.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ling_jax.config import UserError


class PassAtKError(UserError):
    """A k that the samples cannot support (k < 1 or k > n)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one problem with `n` samples of which `c` passed.

    Raises:
      PassAtKError: k < 1, k > n, or c outside [0, n].
    """
    if not 1 <= k <= n:
        raise PassAtKError(f"pass@{k} needs 1 <= k <= n samples per problem, got n={n}: raise --n to at least {k}")
    if not 0 <= c <= n:
        raise PassAtKError(f"{c} passing samples out of n={n} is impossible")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[int, float]:
    """{k: mean pass@k} over problems given as (n, c) pairs (an empty benchmark scores 0)."""
    counts = list(counts)
    return {k: float(np.mean([pass_at_k(n, c, k) for n, c in counts])) if counts else 0.0 for k in ks}


def check_ks(ks: Sequence[int], n: int) -> None:
    """Refuses a k that `n` samples per problem cannot estimate, before any work.

    Raises:
      PassAtKError: a k < 1 or greater than n (the message names both and the fix).
    """
    for k in ks:
        if not 1 <= k <= n:
            raise PassAtKError(f"--k {k} needs at least {k} samples per problem but --n is {n}: "
                               f"pass --n {max(k, 1)} or more, or drop k={k}")
