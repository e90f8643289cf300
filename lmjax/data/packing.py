"""Packing a token stream into training rows (pure numpy).

A split is a stream of tokens in which documents (each BOS, text, EOS) follow one another,
cut into windows. Window `w` covers stream positions
`[w*T, w*T + T + 1)`: `T` inputs and, shifted by one, their `T` targets, so consecutive windows
overlap by one token and no target is lost at a window edge. Nothing is ever padded.

`rows_from_windows` turns windows into a batch:
  * packing on: each document piece in a row is its own segment (ids 1, 2, ... in the row),
    positions restart at 0 for each piece, and a target is kept only if it lies in the same
    document as its input (the EOS of one document does not predict the next one).
  * packing off: plain concatenate-and-split: one segment per row, positions 0..T-1, every
    target kept.
"""

from __future__ import annotations

import numpy as np


def rows_from_windows(
    tokens: np.ndarray, doc_ids: np.ndarray, packing: bool
) -> dict[str, np.ndarray]:
    """tokens, doc_ids: [rows, T+1] (doc_ids: any id, equal within a document) -> batch of [rows, T]."""
    rows, width = tokens.shape
    length = width - 1
    inputs = tokens[:, :-1].astype(np.int32)
    targets = tokens[:, 1:].astype(np.int32)
    index = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
    if not packing:
        return {
            "inputs": inputs,
            "targets": targets,
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": index.copy(),
            "loss_mask": np.ones((rows, length), np.float32),
        }
    docs = doc_ids[:, :-1]
    starts = np.ones((rows, length), bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": (index - segment_start).astype(np.int32),
        "loss_mask": (doc_ids[:, 1:] == docs).astype(np.float32),
    }
