"""`lmjax data prepare|verify|preview`: make a run's data store, check it, look at its batches."""

from __future__ import annotations

import argparse
import hashlib
import itertools
from typing import TYPE_CHECKING

import numpy as np

from lmjax.batch import Batch
from lmjax.commands import experiment
from lmjax.config import Config

if TYPE_CHECKING:
    from lmjax.data.pipeline import Pipeline


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare a run's data store; look at its batches")
    dt = p.add_subparsers(dest="data_command", required=True)
    _add_preview(dt)
    _add_prepare(dt)
    _add_verify(dt)


def _add_preview(dt) -> None:
    q = dt.add_parser(
        "preview", help="per batch: step, content hash, packing efficiency, a document start"
    )
    experiment.add_arguments(q)
    q.add_argument(
        "--workdir",
        default="",
        help="run directory whose tokenizer and store to use (default ~/.cache/lmjax/RUN_NAME)",
    )
    q.add_argument("--start-step", type=int, default=0)
    q.add_argument("--batches", type=int, default=4)
    q.add_argument(
        "--process-index",
        type=int,
        default=0,
        help="show the rows this process of --process-count would read",
    )
    q.add_argument("--process-count", type=int, default=1)
    q.set_defaults(func=preview_from_args)


def _add_prepare(dt) -> None:
    q = dt.add_parser(
        "prepare",
        help="tokenize the run's documents once into a store (no-op "
        "when it exists; reruns finish an interrupted one)",
    )
    experiment.add_arguments(q)
    q.add_argument(
        "--workdir",
        default="",
        help="run directory: its tokenizer.model, and the "
        "store under WORKDIR/data unless data.store_dir "
        "is set (default ~/.cache/lmjax/RUN_NAME)",
    )
    q.add_argument(
        "--beam-runner",
        default="DirectRunner",
        metavar="RUNNER",
        help="Apache Beam runner: DirectRunner (this machine), DataflowRunner, "
        "SparkRunner, FlinkRunner or PortableRunner",
    )
    q.add_argument(
        "--workers", type=int, default=1, help="DirectRunner worker processes (1: in this process)"
    )
    q.add_argument(
        "--beam-options",
        default="",
        metavar="'--NAME=VALUE ...'",
        help="more Beam pipeline options, one quoted string, e.g. '--project=p "
        "--region=us-central1 --temp_location=gs://b/tmp' for Dataflow",
    )
    q.set_defaults(func=prepare_from_args)


def _add_verify(dt) -> None:
    q = dt.add_parser(
        "verify", help="read every record of a store (checksums) in parallel; name bad shards"
    )
    q.add_argument("store", help="the store directory (holding store.json), local or gs://")
    q.add_argument("--workers", type=int, default=16, help="objects read at once")
    q.set_defaults(func=verify_from_args)


def preview_from_args(args: argparse.Namespace) -> int:
    config = experiment.load_experiment(args.experiment, args.overrides)
    preview(
        config,
        experiment.data_workdir(args.workdir, config),
        args.start_step,
        args.batches,
        args.process_index,
        args.process_count,
    )
    return 0


def verify_from_args(args: argparse.Namespace) -> int:
    return verify(args.store, args.workers)


def prepare_from_args(args: argparse.Namespace) -> int:
    config = experiment.load_experiment(args.experiment, args.overrides)
    prepare(
        config,
        experiment.data_workdir(args.workdir, config),
        args.beam_runner,
        args.workers,
        args.beam_options,
    )
    return 0


def prepare(
    config: Config,
    workdir: str,
    runner: str = "DirectRunner",
    workers: int = 1,
    beam_options: str = "",
) -> dict:
    """Prints and returns the summary of preparing the run's store with Apache Beam (a no-op
    when it exists). runner, workers, beam_options: see `beam_engine.pipeline_options`."""
    from lmjax.data import beam_engine, prepare as prepare_lib, sources

    if config.data.source == "synthetic":
        print(f"data.source={config.data.source} has nothing to prepare.")
        return {}
    root = sources.store_root(config.data, workdir)
    options = beam_engine.pipeline_options(runner, workers, beam_options, root)
    tokenizer = prepare_lib.prepare_tokenizer(config.data, workdir)
    assert tokenizer is not None  # only the synthetic source, returned above, has none
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
    from lmjax.data import store

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
    from lmjax.inference import saved_run

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
