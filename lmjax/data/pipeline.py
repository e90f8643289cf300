"""The training data pipeline: documents -> tokens (tf.data) -> packed windows -> batches.

A batch is a dict of numpy arrays, each [rows, seq_len] holding the global rows this process
feeds (`make_pipeline(rows=...)`, by default rows [i*B/n, (i+1)*B/n) of process i of n):
`inputs`, `targets` (int32), `segment_ids` (int32, 1-based per document piece, 0 never occurs
because nothing is padded), `positions` (int32, restarting at 0 per piece) and `loss_mask`
(float32). See `packing.py` for the window layout. Every document is tokenized as BOS, its
text, EOS.

Three ways of producing windows, chosen by `data.source`:
  * packaged / text ("indexed"): the split is tokenized once, in a parallel tf.data map, into a
    `TokenStore`; window `w` is a pure function of `w`, global batch `s` holds windows
    `s*batch_size .. (s+1)*batch_size - 1` and each process computes the rows it feeds.
    Resume at any step costs nothing, works on any process count, and every process count
    sees the same global batches.
  * tfds ("stream"): each process reads its `tfds.even_splits` part of the split with seeded file
    and example shuffling (tf.data), tokenizes batches of documents with sentencepiece's threads
    and packs as it reads. Resume replays the stream up to the step (time proportional to the
    step) and needs the same process count.
  * synthetic: seeded random tokens, one document per row, a pure function of the step.

Training batches are made `_PREFETCH` steps ahead in a background thread. Deleting a tf.data
iterator whose map still runs Python functions waits on its workers, which need the GIL that
the deleting thread holds (a quickstart run once sat a minute at exit in that destructor), so
Python functions run only inside tf.data pipelines that are read to the end (the tokenization
into a `TokenStore`); the endless ones hold only TF ops.
"""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
from typing import Callable, Iterator, Sequence

import numpy as np

from lmjax.config import ConfigError, DataConfig
from lmjax.data import packing, sources
from lmjax.data.tf_setup import tensorflow
from lmjax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)
_ENCODE_BATCH = 64  # documents per tokenizer call
_PREFETCH = 2  # training batches made ahead of the trainer


class DataStateError(ConfigError):
    """A checkpoint's data position cannot be honoured by the current data configuration."""


class Pipeline:
    """Batches for the trainer. `state(step)` is what a checkpoint stores about the data."""

    def __init__(self, *, tokenizer: Tokenizer | None, identity: dict,
                 train: Callable[[int], Iterator[Batch]], evaluation: Callable[[int], list[Batch]]):
        self.tokenizer = tokenizer
        self._identity = identity
        self._train = train
        self._evaluation = evaluation
        self._eval_cache: list[Batch] = []

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """This process's rows of the global batches for steps start_step, start_step+1, ..."""
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative, got {start_step}")
        return self._train(start_step)

    def eval_batches(self, n: int) -> list[Batch]:
        """The first `n` batches of the evaluation split (this process's rows); the same every call."""
        if n > len(self._eval_cache):
            self._eval_cache = self._evaluation(n)
        return self._eval_cache[:n]

    def state(self, step: int) -> dict:
        return {**self._identity, "step": int(step)}

    def check_state(self, state: dict) -> None:
        """Raises `DataStateError` naming every field that differs from the checkpoint's."""
        saved = {k: v for k, v in state.items() if k != "step"}
        diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {self._identity.get(k)!r}"
                 for k in sorted(set(saved) | set(self._identity)) if saved.get(k) != self._identity.get(k)]
        if not diffs:
            return
        hint = ("resume with the data settings the checkpoint was written with (--set data.FIELD=...) "
                "and the same tokenizer, or start a new workdir.")
        if "process_count" in saved and saved.get("process_count") != self._identity.get("process_count"):
            hint = ("data.source=tfds streams each process's own part of the split, so its position "
                    "only holds for the same number of processes: resume on "
                    f"{saved['process_count']} process(es), or use a packaged/text source, whose "
                    "position does not depend on the process count.")
        raise DataStateError("the checkpoint's data position does not match this data pipeline:\n  "
                             + "\n  ".join(diffs) + "\nFix: " + hint)


# ---------------------------------------------------------------- tokenizing inside tf.data


def encode_documents(texts: np.ndarray, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 documents [docs] -> (flat int32 tokens [n], int64 lengths [docs]).

    Each document becomes BOS (when the tokenizer has one, as generation and scoring prompts
    start with it), its tokens, EOS.
    """
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    ids = [bos + x + [tokenizer.eos_id]
           for x in tokenizer.encode_batch([t.decode("utf-8") for t in texts])]
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())), lengths


def tokenized_batches(texts, tokenizer: Tokenizer):
    """tf.data of texts -> tf.data of `encode_documents` outputs, in a parallel map.

    Read it to the end (see the module docstring): its map runs a Python function.
    """
    tf = tensorflow()

    def encode_op(batch):
        flat, lengths = tf.numpy_function(lambda b: encode_documents(b, tokenizer), [batch],
                                          (tf.int32, tf.int64))
        return tf.ensure_shape(flat, [None]), tf.ensure_shape(lengths, [None])

    return (texts.batch(_ENCODE_BATCH)
            .map(encode_op, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def load_token_store(source: sources.Source, split: str, tokenizer: Tokenizer, *,
                     shuffle: bool, seed: int) -> packing.TokenStore:
    """Tokenizes a whole split (canonical order) into a `TokenStore`."""
    flats, lengths = [], []
    for flat, lens in tokenized_batches(sources.split_texts(source, split), tokenizer).as_numpy_iterator():
        flats.append(flat)
        lengths.append(lens)
    if not flats:
        raise ConfigError(f"split {split!r} of {source.dataset_id} is empty.")
    lengths_ = np.concatenate(lengths)
    starts = np.zeros(len(lengths_) + 1, np.int64)
    np.cumsum(lengths_, out=starts[1:])
    return packing.TokenStore(np.concatenate(flats), starts, shuffle=shuffle, seed=seed)


# ---------------------------------------------------------------- window producers


def _indexed_batch(store: packing.TokenStore, step: int, *, global_rows: int, rows: np.ndarray,
                   seq_len: int, pack: bool) -> Batch:
    """Rows `rows` (ascending global row indices) of global batch `step`."""
    parts = [store.windows(step * global_rows + run[0], len(run), seq_len)
             for run in contiguous_runs(rows)]
    return packing.rows_from_windows(np.concatenate([t for t, _ in parts]),
                                     np.concatenate([d for _, d in parts]), pack)


def contiguous_runs(rows: np.ndarray) -> list[np.ndarray]:
    """Ascending indices -> maximal runs of consecutive ones: [0, 1, 2, 6, 7] -> [[0, 1, 2], [6, 7]]."""
    return np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)


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


def _stream_batches(texts, tokenizer: Tokenizer, *, rows: int, seq_len: int, pack: bool) -> Iterator[Batch]:
    def docs():
        for batch in texts.batch(_ENCODE_BATCH).prefetch(2).as_numpy_iterator():
            flat, lengths = encode_documents(batch, tokenizer)
            yield from np.split(flat, np.cumsum(lengths)[:-1])

    windows = packing.stream_windows(docs(), seq_len)
    while True:
        group = list(itertools.islice(windows, rows))
        if len(group) < rows:
            return
        yield packing.rows_from_windows(np.stack([t for t, _ in group]),
                                        np.stack([d for _, d in group]), pack)


def _synthetic_batch(seed: int, stream: int, step: int, rows: range, seq_len: int, vocab_size: int,
                     pack: bool) -> Batch:
    tokens = np.stack([np.random.default_rng([seed, stream, step, r]).integers(
        0, vocab_size, seq_len + 1, dtype=np.int32) for r in rows])
    return packing.rows_from_windows(tokens, np.zeros_like(tokens, np.int64), pack)


# ---------------------------------------------------------------- construction


def make_pipeline(data_cfg: DataConfig, tokenizer: Tokenizer | None, *, process_index: int = 0,
                  process_count: int = 1, rows: Sequence[int] | None = None, workdir: str = "",
                  vocab_size: int | None = None) -> Pipeline:
    """The pipeline for process `process_index` of `process_count`.

    `rows`: the global row indices (ascending) of every batch that this process feeds, as
    `sharding.process_rows` computes them from the batch sharding; default the equal share
    `[i*B/n, (i+1)*B/n)`. `workdir` holds prepared shards of packaged/text sources when
    data.data_dir is empty. `vocab_size` is needed (only) by the synthetic source.
    """
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
    seq_len, pack = data_cfg.seq_len, data_cfg.packing
    identity = {"source": data_cfg.source, "seq_len": seq_len, "batch_size": data_cfg.batch_size,
                "packing": pack, "seed": data_cfg.seed, "shuffle": data_cfg.shuffle}

    if data_cfg.source == "synthetic":
        if not vocab_size or vocab_size < 1:
            raise ConfigError("data.source=synthetic needs vocab_size (pass model.vocab_size).")
        return Pipeline(
            tokenizer=None, identity={**identity, "vocab_size": vocab_size},
            train=lambda start: (_synthetic_batch(data_cfg.seed, 0, s, mine, seq_len, vocab_size, pack)
                                 for s in itertools.count(start)),
            evaluation=lambda n: [_synthetic_batch(data_cfg.seed, 1, s, mine, seq_len, vocab_size, pack)
                                  for s in range(n)])

    if tokenizer is None:
        raise ConfigError(f"data.source={data_cfg.source} needs a tokenizer: call prepare_tokenizer first.")
    source = sources.resolve_source(data_cfg, workdir)
    identity.update(dataset=source.dataset_id, train_split=source.train_split,
                    tokenizer=tokenizer.fingerprint)

    if data_cfg.source in ("packaged", "text"):
        train_store = load_token_store(source, source.train_split, tokenizer,
                                       shuffle=data_cfg.shuffle, seed=data_cfg.seed)
        eval_store = load_token_store(source, source.eval_split, tokenizer, shuffle=False, seed=0)
        layout = dict(global_rows=data_cfg.batch_size, rows=mine, seq_len=seq_len, pack=pack)

        def evaluation(n: int) -> list[Batch]:
            needed = n * data_cfg.batch_size * seq_len
            if needed > eval_store.n_tokens:
                log.warning("%d eval batches need %d tokens but the validation split has %d: "
                            "its documents repeat. Lower run.eval_batches or raise "
                            "data.validation_fraction.", n, needed, eval_store.n_tokens)
            return [_indexed_batch(eval_store, s, **layout) for s in range(n)]

        return Pipeline(
            tokenizer=tokenizer, identity=identity,
            train=lambda start: _prefetched(_indexed_batch(train_store, s, **layout)
                                            for s in itertools.count(start)),
            evaluation=evaluation)

    import tensorflow_datasets as tfds

    # A stream serves one block of rows: processes that need the same block read the same part.
    n_parts, part = data_cfg.batch_size // len(mine), int(mine[0]) // len(mine)
    if data_cfg.batch_size % len(mine) or mine[0] % len(mine) or mine[-1] - mine[0] + 1 != len(mine):
        raise ConfigError(f"data.source=tfds streams one contiguous block of rows per process, but "
                          f"this mesh gives process {process_index} rows {mine.tolist()}: use a "
                          f"packaged/text source (random access) or a mesh whose batch shards "
                          f"follow the process order (mesh.dcn_data / mesh.dcn_fsdp across hosts)")
    for split in (source.train_split, source.eval_split):
        if sources.num_examples(source, split) < n_parts:
            raise ConfigError(f"split {split!r} of {source.dataset_id} has fewer documents than "
                              f"stream parts ({n_parts}); use a larger split.")
    identity.update(process_count=n_parts, shuffle_buffer=data_cfg.shuffle_buffer)
    train_part = tfds.even_splits(source.train_split, n=n_parts)[part]
    eval_part = tfds.even_splits(source.eval_split, n=n_parts)[part]

    def train(start: int) -> Iterator[Batch]:
        texts = sources.split_texts(source, train_part, shuffle_files=data_cfg.shuffle,
                                    seed=data_cfg.seed).repeat()
        if data_cfg.shuffle:
            texts = texts.shuffle(data_cfg.shuffle_buffer, seed=data_cfg.seed, reshuffle_each_iteration=True)
        batches = _stream_batches(texts, tokenizer, rows=len(mine), seq_len=seq_len, pack=pack)
        return _prefetched(itertools.islice(batches, start, None))

    def evaluation(n: int) -> list[Batch]:
        texts = sources.split_texts(source, eval_part).repeat()
        return list(itertools.islice(_stream_batches(texts, tokenizer, rows=len(mine), seq_len=seq_len,
                                                     pack=pack), n))

    return Pipeline(tokenizer=tokenizer, identity=identity, train=train, evaluation=evaluation)
