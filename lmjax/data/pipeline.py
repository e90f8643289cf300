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
global batches: a checkpoint moves between host counts. Step k (0-based) reads global batch
k, or, once the loss-spike guard has skipped some (`Pipeline.skipped`, kept in the
checkpoint's data position), the k-th batch that is not skipped (`data_positions`).

A resume that changes data.batch_size or data.seq_len (only when `checkpoint.accept_changes`
names them) starts a new `Origin`: from the batch it resumes at on, batch p reads global
windows `origin.window + (p - origin.position) * batch_size + r`, where origin.window is the
number of old windows read so far converted to new ones by tokens (rounded up). For one
source without shuffling, no token is read twice and fewer than one new window's tokens are
skipped (windows follow the stream); with shuffling the run stays in the same epoch at the
same fraction of it, but the rest of that one epoch is drawn from the new windows'
permutation, so it may repeat or miss text of the old windows. With a mixture each source's
position is carried over on average (`mixture.assign` deals rows out in seeded blocks), so a
few windows per source may repeat or be skipped.

Evaluation reads the validation split's windows 0, 1, ... in order, each at most once: eval
batch `s` row `r` is window `s*batch_size + r` while that is below W, and an unscored row
(loss_mask 0) past it, so at most ceil(W / batch_size) batches exist (`eval_sets` caps a
larger request and logs it).

With data.mixture (several prepared stores with weights), `mixture.assign` decides which source
global row g reads and which of that source's rows it is; each source then maps its own row
numbers to windows by the rule above, with its own epochs and permutation keys. Evaluation
reads each source's validation split separately (`eval_sets`).

Training batches are made `_PREFETCH` steps ahead in a background thread; the store issues
every read of a batch at once (`store.StoreSplit.fetch`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from lmjax.batch import Batch
from lmjax.config import ConfigError, DataConfig
from lmjax.data import mixture, packing, shuffle, store
from lmjax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_PREFETCH = 2  # training batches made ahead of the trainer
_SHUFFLE_STREAM = 0x5EED  # separates window-permutation keys from other uses of the seed
_SYNTHETIC_TRAIN, _SYNTHETIC_EVAL = 2, 1  # synthetic_batch streams (0: benchmarks and tests)


class DataStateError(ConfigError):
    """A checkpoint's data position cannot be honoured by the current data configuration."""


@dataclasses.dataclass(frozen=True)
class EvalSource:
    """One source's evaluation batches: `batch(s)` is this process's rows of eval batch s."""

    batch: Callable[[int], Batch]
    n_windows: int | None  # distinct windows of its validation split; None: unbounded
    batch_size: int
    weight: float = 1.0  # its mixture weight

    @property
    def n_batches(self) -> int | None:
        """Batches that hold every window once (the last one partly unscored)."""
        return None if self.n_windows is None else -(-self.n_windows // self.batch_size)


@dataclasses.dataclass(frozen=True)
class Origin:
    """Global batch `position` and later read windows `window + (p - position) * batch_size
    + row` (the start of the run, or of the last accepted batch-size or seq_len change)."""

    position: int = 0
    window: int = 0


# What a resume may change in the data position (`checkpoint.accept_changes`), carried over.
CARRIED_FIELDS = ("batch_size", "seq_len")


class Pipeline:
    """Batches for the trainer. `state(step)` is what a checkpoint stores about the data."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer | None,
        identity: dict,
        rows: np.ndarray,
        train: Callable[[np.ndarray], Batch],
        evaluation: dict[str, EvalSource],
        row_sources: Callable[[np.ndarray], list[str]],
    ):
        """rows: this process's rows of each batch; train(windows) and row_sources(windows):
        the batch and the source names of int64 [rows] global windows."""
        self.tokenizer = tokenizer
        self._identity = identity
        self._rows = rows
        self._train = train
        self._evaluation = evaluation
        self._row_sources = row_sources
        # Global batches no step reads (the loss-spike guard's rewinds), ascending.
        self.skipped: tuple[int, ...] = ()
        self.origin = Origin()
        self.changes: list[dict] = []  # accepted changes, as the checkpoints record them

    def windows(self, position: int) -> np.ndarray:
        """int64 [rows]: the global windows this process's rows of batch `position` read."""
        if position < self.origin.position:
            raise ValueError(
                f"batch {position} precedes this run's data change at batch "
                f"{self.origin.position} (another batch size or seq_len): it cannot be rebuilt"
            )
        first = self.origin.window + (position - self.origin.position) * self.batch_size
        return first + self._rows

    @property
    def batch_size(self) -> int:
        return self._identity["batch_size"]

    def train_batch(self, step: int) -> Batch:
        """This process's rows of global batch `step`."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return self._train(self.windows(step))

    def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
        """This process's rows of the global batches that steps start_step, start_step+1, ...
        read: those at `data_positions(start_step, self.skipped)`."""
        positions = data_positions(start_step, self.skipped)
        first = next(positions)
        self.train_batch(first)  # fail here, not in the prefetch thread, on a bad step
        return _prefetched(self.train_batch(p) for p in itertools.chain([first], positions))

    def position(self, step: int) -> int:
        """The global batch that step `step` (0-based) reads, past the skipped ones."""
        return next(data_positions(step, self.skipped))

    def row_sources(self, step: int) -> list[str]:
        """The source each of this process's rows of batch `step` comes from."""
        return self._row_sources(self.windows(step))

    def eval_sets(self, n: int) -> dict[str, list[Batch]]:
        """{source: its first `n` evaluation batches (this process's rows)}, or all of them
        where its validation split has fewer: a window is never scored twice."""
        out = {}
        for name, source in self._evaluation.items():
            k = n if source.n_batches is None else min(n, source.n_batches)
            if k < n:
                log.warning(
                    "run.eval_batches=%d: the validation split of %s has %d windows, %d "
                    "batches of data.batch_size=%d; evaluating those, each window once "
                    "(raise data.validation_fraction for more)",
                    n,
                    name,
                    source.n_windows,
                    k,
                    source.batch_size,
                )
            out[name] = [source.batch(s) for s in range(k)]
        return out

    @property
    def eval_weights(self) -> dict[str, float]:
        """{source: its mixture weight} (1.0 for a single source)."""
        return {name: source.weight for name, source in self._evaluation.items()}

    def eval_batches(self, n: int) -> list[Batch]:
        """Every source's first `n` evaluation batches, one source after another."""
        return [b for batches in self.eval_sets(n).values() for b in batches]

    def state(self, step: int) -> dict:
        """What a checkpoint records: the identity, the step, and any skipped batches, data
        origin and accepted changes."""
        extra: dict = {"skipped": list(self.skipped)} if self.skipped else {}
        if self.origin != Origin():
            extra["origin"] = dataclasses.asdict(self.origin)
        if self.changes:
            extra["changes"] = self.changes
        return {**self._identity, "step": int(step), **extra}

    def check_state(self, state: dict, accept: Sequence[str] = ()) -> None:
        """Adopts a checkpoint's data position: its skipped batches and origin.

        A changed batch_size or seq_len named in `accept` ("data.batch_size", as in
        `checkpoint.accept_changes`) starts a new `Origin` at the batch the resume reads, with
        the windows read so far converted by tokens; the change is logged and recorded.
        Raises `DataStateError` naming every other field that differs from the checkpoint's.
        """
        saved = {k: v for k, v in state.items() if k not in _POSITION_KEYS}
        changed = {
            k: (saved.get(k), self._identity.get(k))
            for k in sorted(set(saved) | set(self._identity))
            if saved.get(k) != self._identity.get(k)
        }
        carried = {k for k in changed if k in CARRIED_FIELDS and f"data.{k}" in accept}
        hint = (
            " (a batch-size or seq_len change is accepted with --set "
            "checkpoint.accept_changes=data.FIELD)"
            if set(changed) - carried <= set(CARRIED_FIELDS)
            else ""
        )
        diffs = [
            f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items() if k not in carried
        ]
        if diffs:
            raise DataStateError(
                "the checkpoint's data position does not match this data pipeline:\n  "
                + "\n  ".join(diffs)
                + "\nFix: resume with the data settings the checkpoint was "
                "written with (--set data.FIELD=...) and the same tokenizer and sources, or "
                f"start a new workdir{hint}."
            )
        self.skipped = tuple(state.get("skipped", ()))
        self.origin = Origin(**state.get("origin", {}))
        self.changes = list(state.get("changes", ()))
        if carried:
            self._carry_over(state, {k: changed[k] for k in sorted(carried)})

    def _carry_over(self, state: dict, changed: dict[str, tuple]) -> None:
        """New origin at the batch that step state["step"] reads: the old windows read before
        it, as new windows of the same tokens (rounded up, so none is read twice)."""
        position = next(data_positions(state["step"], self.skipped))
        old_windows = self.origin.window + (position - self.origin.position) * state["batch_size"]
        window = -(-old_windows * state["seq_len"] // self._identity["seq_len"])
        self.origin = Origin(position, window)
        record = {"step": int(state["step"]), **{k: list(v) for k, v in changed.items()}}
        self.changes.append({**record, "origin": dataclasses.asdict(self.origin)})
        log.warning(
            "data position carried over at step %d: %s; batch %d on reads windows from %d "
            "(%d windows of %d tokens were read before)",
            state["step"],
            ", ".join(f"data.{k} {a} -> {b}" for k, (a, b) in changed.items()),
            position,
            window,
            old_windows,
            state["seq_len"],
        )


# Keys of a data state that say where the run is, not what it reads.
_POSITION_KEYS = ("step", "skipped", "origin", "changes")


def data_positions(start_step: int, skipped: Sequence[int]) -> Iterator[int]:
    """The global batches that steps start_step, start_step+1, ... read: 0, 1, 2, ... without
    `skipped`, from the start_step-th (0-based) on."""
    skip = set(skipped)
    position = start_step
    for s in sorted(skip):
        position += s <= position
    yield from (p for p in itertools.count(position) if p not in skip)


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


def window_starts(
    global_windows: np.ndarray, n_windows: int, seq_len: int, *, shuffle_key: tuple[int, ...] | None
) -> np.ndarray:
    """Stream start positions of global windows g (int [k]) -> int64 [k] (module docstring).

    shuffle_key: integers the permutation key of each epoch derives from (with the epoch);
    None: window g % W, in stream order.
    """
    g = np.asarray(global_windows, np.int64)
    epochs, index = np.divmod(g, n_windows)
    if shuffle_key is not None:
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            key = shuffle.derive_key(*shuffle_key, _SHUFFLE_STREAM, int(epoch))
            index[sel] = shuffle.permute(index[sel], n_windows, key)
    return index * seq_len


def doc_ids_of(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """[rows, width] tokens -> [rows, width] ids equal within a document: EOS seen before t."""
    ends = tokens == eos_id
    return np.cumsum(ends, axis=1) - ends


class WindowReader:
    """Windows of one split of a store: `tokens(windows)` -> [k, seq_len+1]."""

    def __init__(
        self, split: store.StoreSplit, *, seq_len: int, shuffle_key: tuple[int, ...] | None
    ):
        self.split = split
        self.seq_len = seq_len
        self.n_windows = (split.n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ConfigError(
                f"the {split.split} split of {split.directory} has "
                f"{split.n_tokens} tokens, fewer than data.seq_len+1="
                f"{seq_len + 1}: add documents or lower data.seq_len."
            )
        self._key = shuffle_key

    def tokens(self, global_windows: np.ndarray) -> np.ndarray:
        """int32 [k, seq_len+1]."""
        starts = window_starts(global_windows, self.n_windows, self.seq_len, shuffle_key=self._key)
        return self.split.read(starts, self.seq_len + 1)


class MixedReader:
    """Rows of several sources: which source and which of its windows a global row reads is
    `mixture.assign` (one source: row g reads window g)."""

    def __init__(
        self,
        names: list[str],
        readers: list[WindowReader],
        weights: list[float],
        *,
        seed: int,
        eos_id: int,
        pack: bool,
    ):
        self.names = names
        self._readers = readers
        self._quota = mixture.quotas(weights)
        self._seed = seed
        self._eos = eos_id
        self._pack = pack

    @property
    def n_windows(self) -> int:
        """The windows of its one source (evaluation readers have one)."""
        (reader,) = self._readers
        return reader.n_windows

    def assign(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self._readers) == 1:
            return np.zeros(len(rows), np.int64), np.asarray(rows, np.int64)
        return mixture.assign(self._seed, rows, self._quota)

    def batch(self, rows: np.ndarray) -> Batch:
        source, index = self.assign(rows)
        tokens = np.empty((len(rows), self._readers[0].seq_len + 1), np.int32)
        for k in np.unique(source):
            tokens[source == k] = self._readers[k].tokens(index[source == k])
        return packing.rows_from_windows(tokens, doc_ids_of(tokens, self._eos), self._pack)


# ---------------------------------------------------------------- synthetic


def synthetic_batch(
    seed: int,
    stream: int,
    step: int,
    rows: Sequence[int] | np.ndarray,
    seq_len: int,
    vocab_size: int,
    pack: bool = True,
) -> Batch:
    """Seeded random tokens, one document per row: rows `rows` of global batch `step`."""
    tokens = np.stack(
        [
            np.random.default_rng([seed, stream, step, int(r)]).integers(
                0, vocab_size, seq_len + 1, dtype=np.int32
            )
            for r in rows
        ]
    )
    return packing.rows_from_windows(tokens, np.zeros_like(tokens, np.int64), pack)


# ---------------------------------------------------------------- construction


def _rows(
    data_cfg: DataConfig,
    process_index: int,
    process_count: int,
    rows: Sequence[int] | np.ndarray | None,
) -> np.ndarray:
    """The ascending global row indices this process feeds (default: its equal share)."""
    if not 0 <= process_index < process_count:
        raise ConfigError(
            f"process_index={process_index} must lie in [0, process_count={process_count})."
        )
    if rows is None:
        if data_cfg.batch_size % process_count:
            raise ConfigError(
                f"data.batch_size={data_cfg.batch_size} must be divisible by the number "
                f"of processes ({process_count}): each process feeds an equal share."
            )
        share = data_cfg.batch_size // process_count
        rows = range(process_index * share, (process_index + 1) * share)
    mine = np.asarray(rows, np.int64)
    if (
        not len(mine)
        or np.any(np.diff(mine) <= 0)
        or mine[0] < 0
        or mine[-1] >= data_cfg.batch_size
    ):
        raise ConfigError(
            f"rows {list(rows)[:8]}...: expected ascending global row indices in "
            f"[0, data.batch_size={data_cfg.batch_size})"
        )
    return mine


def make_pipeline(
    data_cfg: DataConfig,
    tokenizer: Tokenizer | None,
    *,
    process_index: int = 0,
    process_count: int = 1,
    rows: Sequence[int] | np.ndarray | None = None,
    stores: dict[str, str] | None = None,
    vocab_size: int | None = None,
) -> Pipeline:
    """The pipeline for process `process_index` of `process_count`.

    `rows`: the global row indices (ascending) of every batch that this process feeds, as
    `sharding.process_rows` computes them from the batch sharding; default the equal share
    `[i*B/n, (i+1)*B/n)`. `stores`: {source name: prepared store directory}, one entry, or
    those of data.mixture (`run_stores.run_stores`). `vocab_size`: needed (only) by the synthetic
    source.
    """
    mine = _rows(data_cfg, process_index, process_count, rows)
    identity = {
        "source": data_cfg.source,
        "seq_len": data_cfg.seq_len,
        "batch_size": data_cfg.batch_size,
        "packing": data_cfg.packing,
        "seed": data_cfg.seed,
        "shuffle": data_cfg.shuffle,
    }
    if data_cfg.source == "synthetic" and not data_cfg.mixture:
        return _synthetic_pipeline(data_cfg, mine, identity, vocab_size)
    if tokenizer is None:
        raise ConfigError(
            f"data.source={data_cfg.source} needs a tokenizer: call prepare_tokenizer first."
        )
    if not stores:
        raise ConfigError(
            f"data.source={data_cfg.source} reads prepared stores: pass stores "
            "(see lmjax.data.run_stores)."
        )
    return _store_pipeline(data_cfg, tokenizer, mine, identity, stores)


def _synthetic_pipeline(
    data_cfg: DataConfig, mine: np.ndarray, identity: dict, vocab_size: int | None
) -> Pipeline:
    if not vocab_size or vocab_size < 1:
        raise ConfigError("data.source=synthetic needs vocab_size (pass model.vocab_size).")
    seed, seq_len, pack, size = (
        data_cfg.seed,
        data_cfg.seq_len,
        data_cfg.packing,
        data_cfg.batch_size,
    )

    def train(windows: np.ndarray) -> Batch:
        # Window g is row g of one endless batch per seq_len: an accepted batch-size or
        # seq_len change never re-reads a window (nor the prefix of one).
        return synthetic_batch(seed, _SYNTHETIC_TRAIN, seq_len, windows, seq_len, vocab_size, pack)

    return Pipeline(
        tokenizer=None,
        identity={**identity, "vocab_size": vocab_size},
        rows=mine,
        train=train,
        evaluation={
            "synthetic": EvalSource(
                lambda s: synthetic_batch(
                    seed, _SYNTHETIC_EVAL, s, mine, seq_len, vocab_size, pack
                ),
                None,
                size,
            )
        },
        row_sources=lambda windows: ["synthetic"] * len(windows),
    )


def _open_stores(
    data_cfg: DataConfig, tokenizer: Tokenizer, stores: dict[str, str]
) -> tuple[dict[str, float], dict[str, dict]]:
    """({source: mixture weight}, {source: store metadata}); a ConfigError for a store that
    another tokenizer wrote."""
    weights = (
        dict(mixture.parse(data_cfg.mixture)) if data_cfg.mixture else {n: 1.0 for n in stores}
    )
    metas = {name: store.open_store(stores[name]) for name in weights}
    for name, meta in metas.items():
        if meta["tokenizer"] != tokenizer.fingerprint:
            raise ConfigError(
                f"store {stores[name]} was tokenized with tokenizer "
                f"{meta['tokenizer']}, not {tokenizer.fingerprint}: prepare the "
                "store with this tokenizer."
            )
    return weights, metas


def _store_pipeline(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    mine: np.ndarray,
    identity: dict,
    stores: dict[str, str],
) -> Pipeline:
    weights, metas = _open_stores(data_cfg, tokenizer, stores)
    names, batch_size = list(weights), data_cfg.batch_size
    identity = {
        **identity,
        "mixture": data_cfg.mixture,
        "tokenizer": tokenizer.fingerprint,
        "stores": {n: os.path.basename(os.path.normpath(stores[n])) for n in names},
    }

    def reader(mix: dict[str, float], split: str, shuffled: bool, seed: int) -> MixedReader:
        windows = [
            WindowReader(
                store.StoreSplit(stores[n], split, metas[n]),
                seq_len=data_cfg.seq_len,
                shuffle_key=(data_cfg.seed, names.index(n)) if shuffled else None,
            )
            for n in mix
        ]
        return MixedReader(
            list(mix),
            windows,
            list(mix.values()),
            seed=seed,
            eos_id=tokenizer.eos_id,
            pack=data_cfg.packing,
        )

    train = reader(weights, "train", data_cfg.shuffle, data_cfg.seed)
    evaluation = {n: reader({n: 1.0}, "validation", False, 0) for n in names}
    return Pipeline(
        tokenizer=tokenizer,
        identity=identity,
        rows=mine,
        train=train.batch,
        evaluation={
            n: EvalSource(
                functools.partial(_eval_batch, r, batch_size, mine),
                r.n_windows,
                batch_size,
                weights[n],
            )
            for n, r in evaluation.items()
        },
        row_sources=lambda windows: [names[k] for k in train.assign(windows)[0]],
    )


def _eval_batch(reader: MixedReader, batch_size: int, rows: np.ndarray, step: int) -> Batch:
    """Rows `rows` of eval batch `step`: window g = step*batch_size + row, or, for g past the
    split's last window, that last window again with nothing scored (loss_mask 0)."""
    windows = step * batch_size + rows
    batch = reader.batch(np.minimum(windows, reader.n_windows - 1))
    batch["loss_mask"][windows >= reader.n_windows] = 0.0
    return batch
