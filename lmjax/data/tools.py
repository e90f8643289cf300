"""`lmjax data preview` and `lmjax bench data`: look at batches, time the pipeline alone."""
from __future__ import annotations

import hashlib
import itertools
import time

import numpy as np

from lmjax.config import Config
from lmjax.data.pipeline import Batch, Pipeline, make_pipeline
from lmjax.data.tokenizer import prepare_tokenizer


def build(config: Config, workdir: str, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """The pipeline a training run of `config` in `workdir` uses (tokenizer trained if needed)."""
    tokenizer = prepare_tokenizer(config.data, workdir)
    return make_pipeline(config.data, tokenizer, process_index=process_index,
                         process_count=process_count, workdir=workdir,
                         vocab_size=config.model.vocab_size)


def batch_hash(batch: Batch) -> str:
    """Short hash of a batch's token content (inputs, targets and segment layout)."""
    digest = hashlib.sha256()
    for key in ("inputs", "targets", "segment_ids"):
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:12]


def first_document_start(batch: Batch, pipeline: Pipeline, n_tokens: int = 16) -> str:
    """Decoded start of the first document beginning in the batch (rows read in order)."""
    tok = pipeline.tokenizer
    inputs = batch["inputs"].reshape(-1)
    if tok is None:
        return " ".join(map(str, inputs[:n_tokens]))
    starts = np.flatnonzero(inputs[:-1] == tok.eos_id) + 1
    return tok.decode(inputs[starts[0]:starts[0] + n_tokens]) if len(starts) else ""


def preview(config: Config, workdir: str, start_step: int = 0, batches: int = 4) -> None:
    """Prints, per batch: step, content hash, packing efficiency and a document start."""
    pipeline = build(config, workdir)
    print(f"{'step':>8}  {'hash':12}  {'trained':>8}  {'padding':>8}  first document start")
    for step, batch in zip(itertools.count(start_step),
                           itertools.islice(pipeline.train_batches(start_step), batches)):
        trained = batch["loss_mask"].mean()
        padding = (batch["segment_ids"] == 0).mean()
        print(f"{step:>8}  {batch_hash(batch)}  {trained:>8.2%}  {padding:>8.2%}  "
              f"{first_document_start(batch, pipeline)!r}")


def bench(config: Config, workdir: str, seconds: float = 10.0) -> float:
    """Prints and returns the tokens/s the pipeline alone delivers (after one warm-up batch)."""
    start = time.perf_counter()
    pipeline = build(config, workdir)
    batches = pipeline.train_batches(0)
    first = next(batches)
    ready = time.perf_counter()
    tokens_per_batch = first["inputs"].size
    count, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        next(batches)
        count += 1
    elapsed = time.perf_counter() - begin
    rate = count * tokens_per_batch / elapsed
    d = config.data
    print(f"source={d.source} seq_len={d.seq_len} batch_size={d.batch_size} packing={d.packing}")
    print(f"set-up (tokenizer, shards, tokenizing, first batch): {ready - start:.2f} s")
    print(f"{count} batches in {elapsed:.2f} s: {rate:,.0f} tokens/s")
    return rate
