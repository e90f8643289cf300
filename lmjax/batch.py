"""The batch format that the data pipeline produces and the step and the evaluator consume.

A batch is a dict of five `[batch, seq]` arrays: `inputs` and `targets` (int32 token ids, the
targets shifted by one within a document), `segment_ids` (int32 document ids within a row,
0 = padding), `positions` (int32, restarting at 0 in each document) and `loss_mask` (float32,
1 where the target is scored). At import this module loads nothing, so data code (which
never loads jax) and model code can both depend on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import jax

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

# The dtype of each key, as every producer emits it (tests/unit/test_batch.py holds the synthetic
# pipeline to it) and as ahead-of-time compiles assume it (`abstract_batch`).
BATCH_DTYPES = {
    "inputs": "int32",
    "targets": "int32",
    "segment_ids": "int32",
    "positions": "int32",
    "loss_mask": "float32",
}

Batch = dict[str, Any]  # BATCH_KEYS -> [batch, seq] arrays (numpy or jax)


def select(batch: Mapping[str, Any], where: str = "batch") -> Batch:
    """The BATCH_KEYS entries of `batch`; a ValueError naming the missing keys otherwise."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(
            f"{where} lacks {missing}; batches need {list(BATCH_KEYS)} as [batch, seq] arrays."
        )
    return {k: batch[k] for k in BATCH_KEYS}


def abstract_batch(
    rows: int, seq_len: int, sharding: Any = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """A `[rows, seq_len]` batch as `jax.ShapeDtypeStruct`s of BATCH_DTYPES carrying
    `sharding` (a jax Sharding, or None): the batch argument to lower a step without data."""
    # jax is imported here, not at the top: the data layer (Beam workers, the input
    # pipeline) imports this module and loads no jax (tests/unit/test_batch.py checks it).
    import jax

    return {
        k: jax.ShapeDtypeStruct((rows, seq_len), BATCH_DTYPES[k], sharding=sharding)
        for k in BATCH_KEYS
    }
