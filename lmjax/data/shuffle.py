"""Seeded permutations of [0, n) evaluated pointwise: a keyed Feistel network with cycle walking.

`permute(i, n, key)` is a bijection of [0, n) for every key, computed for the indices asked for
only: shuffling billions of windows needs no array of their size, and the window at any
position of any epoch costs the same to find.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijective avalanche of uint64 values (wrapping arithmetic)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def derive_key(*parts: int) -> int:
    """A 64-bit key from integers (e.g. seed, epoch, stream)."""
    key = np.zeros(1, np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            key = mix64(key ^ np.uint64(part % (1 << 64)) + _GOLDEN)
    return int(key[0])


def _feistel(x: np.ndarray, half_bits: int, key: int) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for r in range(_ROUNDS):
        round_key = np.uint64(derive_key(key, r))
        left, right = right, left ^ (mix64(right ^ round_key) & mask)
    return (left << shift) | right


def permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """index: int array with values in [0, n) -> int64 array: the keyed permutation at those points.

    The Feistel network permutes [0, 4**h) with 4**h >= n; values that land at n or above are
    encrypted again until they fall inside (cycle walking), which keeps it a bijection of [0, n).
    """
    index = np.asarray(index, np.int64)
    if n < 1 or (index.size and (index.min() < 0 or index.max() >= n)):
        raise ValueError(f"indices must lie in [0, {n})")
    half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    out = index.astype(np.uint64)
    todo = np.ones(out.shape, bool)
    while todo.any():
        out[todo] = _feistel(out[todo], half_bits, key)
        todo = out >= np.uint64(n)
    return out.astype(np.int64)
