"""The batch format that the data pipeline produces and the step and the evaluator consume.

A batch is a dict of five `[batch, seq]` arrays: `inputs` and `targets` (int32 token ids, the
targets shifted by one within a document), `segment_ids` (int32 document ids within a row,
0 = padding), `positions` (int32, restarting at 0 in each document) and `loss_mask` (float32,
1 where the target is scored). This module imports nothing, so data and model code can both
depend on it.
"""
from __future__ import annotations

from typing import Any, Mapping

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")

Batch = dict[str, Any]  # BATCH_KEYS -> [batch, seq] arrays (numpy or jax)


def select(batch: Mapping[str, Any], where: str = "batch") -> Batch:
    """The BATCH_KEYS entries of `batch`; a ValueError naming the missing keys otherwise."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"{where} lacks {missing}; batches need {list(BATCH_KEYS)} as "
                         "[batch, seq] arrays.")
    return {k: batch[k] for k in BATCH_KEYS}
