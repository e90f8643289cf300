"""`lmjax data prepare|verify|preview`: make a run's data store, check it, look at its batches."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np

from lmjax.batch import Batch
from lmjax.config import Config
from lmjax.data import beam_engine, prepare as prepare_lib, store
from lmjax.data.pipeline import Pipeline
from lmjax.inference import saved_run


def prepare(
    config: Config,
    workdir: str,
    runner: str = "DirectRunner",
    workers: int = 1,
    beam_options: str = "",
) -> dict:
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
    print(
        f"{s['shards']} shards, {s['documents']:,} documents, {s['bytes'] / 1e6:,.1f} MB of "
        f"text -> {s['train_tokens']:,} train + {s['validation_tokens']:,} validation tokens"
    )
    print(
        f"skipped: {s['empty_documents']} empty documents, {s['empty_files']} empty files, "
        f"{s['bad_utf8']} documents with bytes that are not UTF-8"
    )
    print(
        f"prepared in {s['seconds']:.1f} s: {s['tokens_per_second']:,.0f} tokens/s, "
        f"{s['megabytes_per_second']:.2f} MB/s (figures of the run that wrote the store)"
    )
    return s


def verify(directory: str, workers: int = 16) -> int:
    """Reads every record of the store at `directory`, `workers` objects at a time; prints
    each damaged shard with its repair. Returns the exit code: 0 sound, 1 damaged."""
    meta = store.open_store(directory)
    problems = store.verify(directory, meta["vocab_size"], workers)
    for shard, problem in problems.items():
        print(f"shard {shard}: {problem}")
    shards, tokens = (
        len(meta["shards"]),
        sum(s[split]["tokens"] for s in meta["shards"] for split in store.SPLITS),
    )
    if problems:
        print(f"store {directory}: {len(problems)} of {shards} shards damaged")
        return 1
    print(f"store {directory}: all {shards} shards sound ({tokens:,} tokens read)")
    return 0


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
    return tok.decode(row[starts[0] : starts[0] + n_tokens]) if len(starts) else ""


def preview(
    config: Config,
    workdir: str,
    start_step: int = 0,
    batches: int = 4,
    process_index: int = 0,
    process_count: int = 1,
) -> None:
    """Prints, per batch: step, content hash and packing efficiency; then per row of this
    process: its global row, source and a document start."""
    pipeline = saved_run.pipeline(config, workdir, process_index, process_count)
    rows = config.data.batch_size // process_count
    print(
        f"process {process_index} of {process_count}: global rows "
        f"[{process_index * rows}, {(process_index + 1) * rows})"
    )
    print(f"{'step':>10}  {'hash':12}  {'trained':>8}  row  source    first document start")
    for step, batch in zip(
        itertools.count(start_step), itertools.islice(pipeline.train_batches(start_step), batches)
    ):
        print(f"{step:>10}  {batch_hash(batch)}  {batch['loss_mask'].mean():>8.2%}")
        for r, source in enumerate(pipeline.row_sources(step)):
            print(
                f"{'':>34}{process_index * rows + r:>4}  {source:8}  "
                f"{document_start(batch['inputs'][r], pipeline)!r}"
            )
