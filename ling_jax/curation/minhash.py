"""MinHash signatures over word n-gram shingles and the LSH banding, as in The Stack's near-deduplication.

Tokens are the `\\w+` words of a document; shingles are their n-grams (5 by default), each hashed to 32
bits (CRC32 of the tokens, combined polynomially: deterministic across processes, unlike Python's `hash`).
A signature holds, for each of `num_perm` multiply-shift hash functions `((a*h + b) mod 2^64) >> 32`
(a odd: a universal family), the minimum over the document's shingles. The fraction of equal signature
entries estimates the Jaccard similarity.
`lsh_params` picks the bands x rows that minimise the weighted false-positive and false-negative areas
around the threshold (BigCode's `optimal_param`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import zlib

import numpy as np

_WORD = re.compile(r"\w+")
_SHIFT = np.uint64(32)
_SEED = 0x5EED


@functools.cache
def permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """The `(a, b)` coefficients of the hash functions (fixed by `num_perm` alone)."""
    rng = np.random.default_rng(_SEED)
    a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # Odd.
    b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64)
    return a, b


def shingles(text: str, ngram: int) -> np.ndarray:
    """The distinct 32-bit hashes of the word n-grams of `text` (the words themselves when fewer than n)."""
    words = np.array([zlib.crc32(w.encode()) for w in _WORD.findall(text)], dtype=np.uint64)
    if len(words) == 0:
        return np.zeros(0, np.uint64)
    n = min(ngram, len(words))
    h = np.zeros(len(words) - n + 1, dtype=np.uint64)
    for k in range(n):  # h = sum(words[i+k] * 1000003^k) mod 2^32.
        h = (h * np.uint64(1000003) + words[k : len(words) - n + 1 + k]) & np.uint64(0xFFFFFFFF)
    return np.unique(h)


def signature(text: str, num_perm: int, ngram: int, chunk: int = 4096) -> np.ndarray:
    """The MinHash signature `[num_perm]` uint32 of `text` (all-max for a document without words)."""
    a, b = permutations(num_perm)
    sig = np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
    h = shingles(text, ngram)
    for lo in range(0, len(h), chunk):
        values = (h[lo : lo + chunk, None] * a[None, :] + b[None, :]) >> _SHIFT  # Wraps mod 2^64.
        sig = np.minimum(sig, values.min(axis=0))
    return sig.astype(np.uint32)


def jaccard_estimate(x: np.ndarray, y: np.ndarray) -> float:
    """The fraction of equal entries of two signatures."""
    return float(np.mean(x == y))


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per band: the band index and a digest of its rows."""
    return [bytes([i % 256, i // 256]) + hashlib.blake2b(sig[i * rows : (i + 1) * rows].tobytes(), digest_size=12)
            .digest() for i in range(bands)]


def _area(f, lo: float, hi: float, steps: int = 200) -> float:
    xs = np.linspace(lo, hi, steps)
    return float(np.trapezoid([f(x) for x in xs], xs))


@functools.cache
def lsh_params(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    """The `(bands, rows)` with `bands * rows <= num_perm` that minimise the weighted error areas."""
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _area(lambda s, b=b, r=r: 1 - (1 - s ** r) ** b, 0.0, threshold)
            fn = _area(lambda s, b=b, r=r: (1 - s ** r) ** b, threshold, 1.0)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
    return best
