"""Host rows to global arrays: each process's data pipeline produces only the rows of the
global batch that its devices hold (`sharding.process_rows`); `global_batch` assembles them
into global arrays laid out by the batch sharding, without any process holding the others'."""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding

from lmjax.batch import BATCH_KEYS, Batch
from lmjax.parallel import sharding


@functools.lru_cache(maxsize=8)
def _row_layout(batch_sharding: NamedSharding, n_local: int) -> tuple[int, np.ndarray]:
    """(global rows, the global row indices this process holds) when it holds `n_local` rows;
    the same every step, so computed once per layout."""
    shards = sharding.batch_shard_count(batch_sharding)
    held = len(sharding.process_rows(batch_sharding, shards))  # batch shards on this process
    if (n_local * shards) % held:
        raise ValueError(f"{n_local} local rows cannot be {held} of {shards} equal batch shards")
    global_rows = n_local * shards // held
    return global_rows, sharding.process_rows(batch_sharding, global_rows)


def global_batch(local: dict[str, np.ndarray], batch_sharding: NamedSharding) -> Batch:
    """Assembles this process's rows into global arrays laid out by `batch_sharding`.

    local: arrays [rows, seq] holding, in order, the global rows `sharding.process_rows`
    names for this process (the global batch size follows from their count). Each device
    gets exactly the rows of its batch shard, also when processes share rows.
    """
    global_rows, rows = _row_layout(batch_sharding, len(local["inputs"]))

    def assemble(x: np.ndarray) -> jax.Array:
        def block(index):
            return x[np.searchsorted(rows, np.arange(global_rows)[index[0]])][:, *index[1:]]

        return jax.make_array_from_callback((global_rows, *x.shape[1:]), batch_sharding, block)

    return {k: assemble(np.asarray(local[k])) for k in BATCH_KEYS}
