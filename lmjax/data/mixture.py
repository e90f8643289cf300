"""Which source each global row reads: a pure function of (seed, row), exact weights per block.

Global rows (row r of step s is g = s*batch_size + r) are cut into blocks of `BLOCK` rows.
Every block gives source k exactly `quota[k]` rows (the largest-remainder rounding of
BLOCK * weight[k]) in a seeded random order, so over any whole number of blocks the realized
proportions are the quotas and no source's share drifts. Row g of source k is that source's
row number `block * quota[k] + (rows of source k before g in its block)`: each source walks its
own windows (and epochs) independently, and finding the source and index of any row costs one
block's permutation, whatever the step.
"""

from __future__ import annotations

import functools

import numpy as np

from lmjax.config import ConfigError

BLOCK = 512


def parse(spec: str) -> list[tuple[str, float]]:
    """ "web:0.7,code:0.3" -> [("web", 0.7), ("code", 0.3)], weights normalized to sum 1."""
    entries = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, sep, weight = item.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise ConfigError(
                f"data.mixture entry {item!r}: expected NAME:WEIGHT with a positive "
                "weight, e.g. web:0.7,books:0.3"
            )
        entries.append((name, value))
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.mixture names a source twice: {names}")
    total = sum(w for _, w in entries)
    return [(n, w / total) for n, w in entries]


def quotas(weights: list[float]) -> np.ndarray:
    """Rows per block of each source: int64 [sources], summing to BLOCK (largest remainder)."""
    exact = np.asarray(weights, np.float64) * BLOCK
    quota = np.floor(exact).astype(np.int64)
    short = BLOCK - int(quota.sum())
    quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    if (quota == 0).any():
        raise ConfigError(
            f"data.mixture weight {min(weights):.2g} is below 1/{BLOCK}: that source "
            "would never be read; raise it or drop the source."
        )
    return quota


@functools.lru_cache(maxsize=8)
def _block(seed: int, block: int, quota: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(source of each position [BLOCK], its rank among that source's positions [BLOCK])."""
    labels = np.repeat(np.arange(len(quota)), quota)
    source = np.random.default_rng([seed, block]).permutation(labels)
    order = np.argsort(source, kind="stable")
    firsts = np.concatenate([[0], np.cumsum(quota)[:-1]])
    rank = np.empty(BLOCK, np.int64)
    rank[order] = np.arange(BLOCK) - np.repeat(firsts, quota)
    return source, rank


def assign(seed: int, rows: np.ndarray, quota: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Global rows int [k] -> (source index [k], row number within that source [k])."""
    rows = np.asarray(rows, np.int64)
    blocks, pos = np.divmod(rows, BLOCK)
    source = np.empty(rows.shape, np.int64)
    index = np.empty(rows.shape, np.int64)
    key = tuple(int(q) for q in quota)
    for block in np.unique(blocks):
        sel = blocks == block
        src, rank = _block(seed, int(block), key)
        source[sel] = src[pos[sel]]
        index[sel] = block * quota[source[sel]] + rank[pos[sel]]
    return source, index
