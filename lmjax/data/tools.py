"""`lmjax data prepare|preview` and `lmjax bench data`: make the store, look at batches, time reads."""
from __future__ import annotations

import hashlib
import itertools
import time

import numpy as np

from lmjax.config import Config
from lmjax.data import beam_engine
from lmjax.data import prepare as prepare_lib
from lmjax.data.pipeline import Batch, Pipeline, make_pipeline


def build(config: Config, workdir: str, process_index: int = 0, process_count: int = 1) -> Pipeline:
    """The pipeline a training run of `config` in `workdir` uses (tokenizer and store made if
    missing, in this process)."""
    tokenizer = prepare_lib.prepare_tokenizer(config.data, workdir)
    stores = None if tokenizer is None else prepare_lib.run_stores(
        config.data, tokenizer, prepare_lib.store_root(config.data, workdir), leader=True)
    return make_pipeline(config.data, tokenizer, process_index=process_index,
                         process_count=process_count, stores=stores,
                         vocab_size=config.model.vocab_size)


def prepare(config: Config, workdir: str, runner: str = "DirectRunner", workers: int = 1,
            beam_options: str = "") -> dict:
    """Prints and returns the summary of preparing the run's store with Apache Beam (a no-op
    when it exists). runner, workers, beam_options: see `beam_engine.pipeline_options`."""
    if config.data.source == "synthetic":
        print(f"data.source={config.data.source} has nothing to prepare.")
        return {}
    root = prepare_lib.store_root(config.data, workdir)
    options = beam_engine.pipeline_options(runner, workers, beam_options, root)
    tokenizer = prepare_lib.prepare_tokenizer(config.data, workdir)
    directory, meta = prepare_lib.prepare(config.data, tokenizer, root, beam_options=options)
    s = meta["summary"]
    print(f"store: {directory}")
    print(f"{s['shards']} shards, {s['documents']:,} documents, {s['bytes'] / 1e6:,.1f} MB of "
          f"text -> {s['train_tokens']:,} train + {s['validation_tokens']:,} validation tokens")
    print(f"skipped: {s['empty_documents']} empty documents, {s['empty_files']} empty files, "
          f"{s['bad_utf8']} documents with bytes that are not UTF-8")
    print(f"prepared in {s['seconds']:.1f} s: {s['tokens_per_second']:,.0f} tokens/s, "
          f"{s['megabytes_per_second']:.2f} MB/s (figures of the run that wrote the store)")
    return s


def batch_hash(batch: Batch) -> str:
    """Short hash of a batch's token content (inputs, targets and segment layout)."""
    digest = hashlib.sha256()
    for key in ("inputs", "targets", "segment_ids"):
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:12]


def document_start(row: np.ndarray, pipeline: Pipeline, n_tokens: int = 12) -> str:
    """Decoded start of the first document beginning in one row of inputs."""
    tok = pipeline.tokenizer
    if tok is None:
        return " ".join(map(str, row[:n_tokens]))
    starts = np.flatnonzero(row[:-1] == tok.eos_id) + 1
    return tok.decode(row[starts[0]:starts[0] + n_tokens]) if len(starts) else ""


def preview(config: Config, workdir: str, start_step: int = 0, batches: int = 4,
            process_index: int = 0, process_count: int = 1) -> None:
    """Prints, per batch: step, content hash and packing efficiency; then per row of this
    process: its global row, source and a document start."""
    pipeline = build(config, workdir, process_index, process_count)
    rows = config.data.batch_size // process_count
    print(f"process {process_index} of {process_count}: global rows "
          f"[{process_index * rows}, {(process_index + 1) * rows})")
    print(f"{'step':>10}  {'hash':12}  {'trained':>8}  row  source    first document start")
    for step, batch in zip(itertools.count(start_step),
                           itertools.islice(pipeline.train_batches(start_step), batches)):
        print(f"{step:>10}  {batch_hash(batch)}  {batch['loss_mask'].mean():>8.2%}")
        for r, source in enumerate(pipeline.row_sources(step)):
            print(f"{'':>34}{process_index * rows + r:>4}  {source:8}  "
                  f"{document_start(batch['inputs'][r], pipeline)!r}")


def bench(config: Config, workdir: str, seconds: float = 10.0, start_step: int = 0) -> float:
    """Prints and returns the tokens/s the pipeline alone delivers from `start_step` (after one
    warm-up batch), and the set-up time to that first batch."""
    start = time.perf_counter()
    pipeline = build(config, workdir)
    batches = pipeline.train_batches(start_step)
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
    print(f"set-up (tokenizer, store, first batch at step {start_step}): {ready - start:.2f} s")
    print(f"{count} batches in {elapsed:.2f} s: {rate:,.0f} tokens/s")
    return rate
