"""Packing a token stream into training rows (pure numpy).

Every source produces the same thing: an endless stream of tokens in which documents (each
BOS, text, EOS) follow one another, cut into windows. Window `w` covers stream positions
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

import functools
from typing import Iterable, Iterator

import numpy as np

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def rows_from_windows(tokens: np.ndarray, doc_ids: np.ndarray, packing: bool) -> dict[str, np.ndarray]:
    """tokens, doc_ids: [rows, T+1] (doc_ids: any id, equal within a document) -> batch of [rows, T]."""
    rows, width = tokens.shape
    length = width - 1
    inputs = tokens[:, :-1].astype(np.int32)
    targets = tokens[:, 1:].astype(np.int32)
    index = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
    if not packing:
        return {"inputs": inputs, "targets": targets,
                "segment_ids": np.ones((rows, length), np.int32), "positions": index.copy(),
                "loss_mask": np.ones((rows, length), np.float32)}
    docs = doc_ids[:, :-1]
    starts = np.ones((rows, length), bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": (index - segment_start).astype(np.int32),
            "loss_mask": (doc_ids[:, 1:] == docs).astype(np.float32)}


class TokenStore:
    """All documents of a split, tokenized, as one flat array; windows are O(1) to gather.

    `tokens`: [n_tokens] every tokenized document, in the split's canonical order.
    `doc_starts`: [n_docs + 1] offsets into `tokens`. Epoch `e` orders the documents by a
    permutation seeded with `(seed, e)` (identity when not shuffling); epochs follow one another,
    so stream position `p` lies in epoch `p // n_tokens`. Window contents are a pure function of
    the window index: no iteration state, resume at any step costs the same.
    """

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, *, shuffle: bool, seed: int):
        if len(doc_starts) < 2 or doc_starts[-1] == 0:
            raise ValueError("a TokenStore needs at least one non-empty document")
        self.tokens = tokens
        self.doc_starts = doc_starts
        self.lengths = np.diff(doc_starts)
        self.shuffle = shuffle
        self.seed = seed

    @property
    def n_docs(self) -> int:
        return len(self.lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.doc_starts[-1])

    @functools.lru_cache(maxsize=4)
    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order [n_docs], stream offsets of the ordered documents [n_docs + 1]) for one epoch."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_docs)
        else:
            order = np.arange(self.n_docs)
        offsets = np.zeros(self.n_docs + 1, np.int64)
        np.cumsum(self.lengths[order], out=offsets[1:])
        return order, offsets

    def windows(self, first: int, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows first..first+count-1 of width length+1 -> (tokens, doc_ids), each [count, length+1].

        doc_ids number document occurrences in the stream (epoch * n_docs + rank in the epoch).
        """
        pos = (np.arange(first, first + count, dtype=np.int64)[:, None] * length
               + np.arange(length + 1, dtype=np.int64)[None, :])
        epochs, offset = np.divmod(pos, self.n_tokens)
        tokens = np.empty(pos.shape, self.tokens.dtype)
        doc_ids = np.empty(pos.shape, np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            order, offsets = self.epoch_order(int(epoch))
            rank = np.searchsorted(offsets, offset[sel], side="right") - 1
            doc = order[rank]
            tokens[sel] = self.tokens[self.doc_starts[doc] + offset[sel] - offsets[rank]]
            doc_ids[sel] = epoch * self.n_docs + rank
        return tokens, doc_ids


def stream_windows(docs: Iterable[np.ndarray], length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cuts a stream of tokenized documents into windows of width length+1.

    Yields (tokens [length+1], doc_ids [length+1]) with the same layout as `TokenStore.windows`
    (doc_ids count documents in stream order); a final partial window is dropped.
    """
    width = length + 1
    tok_buf = np.empty(0, np.int32)
    doc_buf = np.empty(0, np.int64)
    for n, doc in enumerate(docs):
        tok_buf = np.concatenate([tok_buf, np.asarray(doc, np.int32)])
        doc_buf = np.concatenate([doc_buf, np.full(len(doc), n, np.int64)])
        start = 0
        while len(tok_buf) - start >= width:
            yield tok_buf[start:start + width], doc_buf[start:start + width]
            start += length
        tok_buf, doc_buf = tok_buf[start:], doc_buf[start:]
