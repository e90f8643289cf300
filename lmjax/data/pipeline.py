"""The training data pipeline: a prepared token stream -> shuffled windows -> packed batches.

A batch is a dict of numpy arrays, each [rows, seq_len] holding the global rows this process
feeds (by default rows [i*B/n, (i+1)*B/n) of process i of n):
`inputs`, `targets` (int32), `segment_ids` (int32, 1-based per document piece, 0 never occurs
because nothing is padded), `positions` (int32, restarting at 0 per piece) and `loss_mask`
(float32). See `packing.py` for the window layout; every document is BOS, text, EOS
(`Tokenizer.encode_documents`).

Rule: global batch `s` is a pure function of (store, seed, s). Its row `r` is global window
`g = s*batch_size + r`; a split of N tokens has W = (N-1) // seq_len windows (window w covers
stream positions [w*T, w*T+T+1)); window `g` lies in epoch `g // W` and is window
`permute(g % W, W, key(seed, epoch))` of the stream (`shuffle.py`; the identity without
shuffling). Each process computes only the rows it feeds (`make_pipeline(rows=...)`). Hence resuming at any
step costs the same as starting, needs no replay, and every process count sees the same
global batches: a checkpoint moves between host counts. Evaluation reads the validation
split's windows 0, 1, ... in order.

Training batches are made `_PREFETCH` steps ahead in a background thread; ArrayRecord reads the
records of a batch in parallel.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from lmjax.config import ConfigError, DataConfig
from lmjax.data import packing, shuffle, store
from lmjax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)
_PREFETCH = 2  # training batches made ahead of the trainer
_SHUFFLE_STREAM = 0x5EED  # separates window-permutation keys from other uses of the seed


class DataStateError(ConfigError):
    """A checkpoint's data position cannot be honoured by the current data configuration."""


class Pipeline:
    """Batches for the trainer. `state(step)` is what a checkpoint stores about the data."""

    def __init__(self, *, tokenizer: Tokenizer | None, identity: dict,
                 train: Callable[[int], Batch], evaluation: Callable[[int], Batch]):
        self.tokenizer = tokenizer
        self._identity = identity
        self._train = train
        self._evaluation = evaluation

    def train_batch(self, step: int) -> Batch:
        """This process's rows of global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return self._train(step)

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """This process's rows of the global batches for steps start_step, start_step+1, ..."""
        self.train_batch(start_step)  # fail here, not in the prefetch thread, on a bad step
        return _prefetched(self._train(s) for s in itertools.count(start_step))

    def eval_batches(self, n: int) -> list[Batch]:
        """The first `n` batches of the evaluation split (this process's rows)."""
        return [self._evaluation(s) for s in range(n)]

    def state(self, step: int) -> dict:
        return {**self._identity, "step": int(step)}

    def check_state(self, state: dict) -> None:
        """Raises `DataStateError` naming every field that differs from the checkpoint's."""
        saved = {k: v for k, v in state.items() if k != "step"}
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {self._identity.get(k)!r}"
                 for k in sorted(set(saved) | set(self._identity)) if saved.get(k) != self._identity.get(k)]
        if diffs:
            raise DataStateError(
                "the checkpoint's data position does not match this data pipeline:\n  "
                + "\n  ".join(diffs) + "\nFix: resume with the data settings the checkpoint was "
                "written with (--set data.FIELD=...) and the same tokenizer and sources, or "
                "start a new workdir.")


def _prefetched(batches: Iterator[Batch], depth: int = _PREFETCH) -> Iterator[Batch]:
    """Yields the items of `batches`, advanced `depth` items ahead in one background thread.
    Closing the returned generator (or dropping it) stops the thread."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmjax-data")
    pending = collections.deque(pool.submit(next, batches) for _ in range(depth))
    try:
        while True:
            try:
                batch = pending.popleft().result()
            except StopIteration:
                return
            pending.append(pool.submit(next, batches))
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- windows of a store


def window_starts(global_windows: np.ndarray, n_windows: int, seq_len: int, *, shuffle_seed: int | None
                  ) -> np.ndarray:
    """Stream start positions of global windows g (int [k]) -> int64 [k] (module docstring).

    shuffle_seed None: window g % W, in stream order.
    """
    g = np.asarray(global_windows, np.int64)
    epochs, index = np.divmod(g, n_windows)
    if shuffle_seed is not None:
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            key = shuffle.derive_key(shuffle_seed, _SHUFFLE_STREAM, int(epoch))
            index[sel] = shuffle.permute(index[sel], n_windows, key)
    return index * seq_len


def doc_ids_of(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """[rows, width] tokens -> [rows, width] ids equal within a document: EOS seen before t."""
    ends = tokens == eos_id
    return np.cumsum(ends, axis=1) - ends


class WindowReader:
    """Windows of one split of a store: `batch(global_windows)` -> packed batch rows."""

    def __init__(self, split: store.StoreSplit, *, seq_len: int, pack: bool, eos_id: int,
                 shuffle_seed: int | None):
        self.split = split
        self.seq_len = seq_len
        self.n_windows = (split.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ConfigError(f"the {split.split} split of {split.directory} has "
                              f"{split.n_tokens} tokens, fewer than data.seq_len+1="
                              f"{seq_len + 1}: add documents or lower data.seq_len.")
        self._pack = pack
        self._eos = eos_id
        self._seed = shuffle_seed

    def tokens(self, global_windows: np.ndarray) -> np.ndarray:
        """int32 [k, seq_len+1]."""
        starts = window_starts(global_windows, self.n_windows, self.seq_len, shuffle_seed=self._seed)
        return self.split.read(starts, self.seq_len + 1)

    def batch(self, global_windows: np.ndarray) -> Batch:
        tokens = self.tokens(global_windows)
        return packing.rows_from_windows(tokens, doc_ids_of(tokens, self._eos), self._pack)


# ---------------------------------------------------------------- synthetic


def synthetic_batch(seed: int, stream: int, step: int, rows: Sequence[int], seq_len: int,
                    vocab_size: int, pack: bool = True) -> Batch:
    """Seeded random tokens, one document per row: rows `rows` of global batch `step`."""
    tokens = np.stack([np.random.default_rng([seed, stream, step, r]).integers(
        0, vocab_size, seq_len + 1, dtype=np.int32) for r in rows])
    return packing.rows_from_windows(tokens, np.zeros_like(tokens, np.int64), pack)


# ---------------------------------------------------------------- construction


def _rows(data_cfg: DataConfig, process_index: int, process_count: int,
          rows: Sequence[int] | None) -> np.ndarray:
    """The ascending global row indices this process feeds (default: its equal share)."""
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} must lie in [0, process_count={process_count}).")
    if rows is None:
        if data_cfg.batch_size % process_count:
            raise ConfigError(f"data.batch_size={data_cfg.batch_size} must be divisible by the number "
                              f"of processes ({process_count}): each process feeds an equal share.")
        share = data_cfg.batch_size // process_count
        rows = range(process_index * share, (process_index + 1) * share)
    mine = np.asarray(rows, np.int64)
    if not len(mine) or np.any(np.diff(mine) <= 0) or mine[0] < 0 or mine[-1] >= data_cfg.batch_size:
        raise ConfigError(f"rows {list(rows)[:8]}...: expected ascending global row indices in "
                          f"[0, data.batch_size={data_cfg.batch_size})")
    return mine


def make_pipeline(data_cfg: DataConfig, tokenizer: Tokenizer | None, *, process_index: int = 0,
                  process_count: int = 1, rows: Sequence[int] | None = None, store_dir: str = "",
                  vocab_size: int | None = None) -> Pipeline:
    """The pipeline for process `process_index` of `process_count`.

    `rows`: the global row indices (ascending) of every batch that this process feeds, as
    `sharding.process_rows` computes them from the batch sharding; default the equal share
    `[i*B/n, (i+1)*B/n)`. `store_dir`: the prepared store (`prepare.ensure_store` /
    `prepare.prepare`) of a packaged/text/tfds source. `vocab_size`: needed (only) by the
    synthetic source.
    """
    mine = _rows(data_cfg, process_index, process_count, rows)
    seq_len, pack, batch_size = data_cfg.seq_len, data_cfg.packing, data_cfg.batch_size
    identity = {"source": data_cfg.source, "seq_len": seq_len, "batch_size": batch_size,
                "packing": pack, "seed": data_cfg.seed, "shuffle": data_cfg.shuffle}
    if data_cfg.source == "synthetic":
        if not vocab_size or vocab_size < 1:
            raise ConfigError("data.source=synthetic needs vocab_size (pass model.vocab_size).")
        return Pipeline(
            tokenizer=None, identity={**identity, "vocab_size": vocab_size},
            train=lambda s: synthetic_batch(data_cfg.seed, 0, s, mine, seq_len, vocab_size, pack),
            evaluation=lambda s: synthetic_batch(data_cfg.seed, 1, s, mine, seq_len, vocab_size, pack))

    if tokenizer is None:
        raise ConfigError(f"data.source={data_cfg.source} needs a tokenizer: call prepare_tokenizer first.")
    if not store_dir:
        raise ConfigError(f"data.source={data_cfg.source} reads a prepared store: pass store_dir "
                          "(see lmjax.data.prepare).")
    meta = store.open_store(store_dir)
    if meta["tokenizer"] != tokenizer.fingerprint:
        raise ConfigError(f"store {store_dir} was tokenized with tokenizer {meta['tokenizer']}, "
                          f"not {tokenizer.fingerprint}: prepare the store with this tokenizer.")
    identity.update(store=os.path.basename(os.path.normpath(store_dir)), tokenizer=tokenizer.fingerprint)
    common = dict(seq_len=seq_len, pack=pack, eos_id=tokenizer.eos_id)
    train = WindowReader(store.StoreSplit(store_dir, "train", meta), **common,
                         shuffle_seed=data_cfg.seed if data_cfg.shuffle else None)
    evaluation = WindowReader(store.StoreSplit(store_dir, "validation", meta), **common,
                              shuffle_seed=None)
    return Pipeline(tokenizer=tokenizer, identity=identity,
                    train=lambda s: train.batch(s * batch_size + mine),
                    evaluation=lambda s: evaluation.batch(s * batch_size + mine))
