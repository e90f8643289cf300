"""The Apache Beam pipeline of `lmjax data prepare`: the shard function mapped over the shards.

    Create(shards) | Map(prepare one shard)

Each shard's output (its token arrays, then its shard record) is written by the worker
that prepared it, into the store directory; the pipeline returns nothing to the launcher, so
the same pipeline runs where results never come back (Dataflow, Spark, Flink). The launcher
reads the shard records once the pipeline has finished and commits the store (`prepare.py`).
Create redistributes its elements (its default reshuffle), so the shards spread over workers.

Runners: the DirectRunner on this machine (`workers` > 1: that many worker processes,
multi_processing mode; 1: in this process, in_memory mode), or any runner named in
RUNNERS with its own options (project, region, temp_location, master URL...). Workers of a
remote runner need lmjax installed (e.g. --setup_file or --sdk_container_image) and the
inputs and store directory reachable (gs://).
"""

from __future__ import annotations

import shlex
from typing import Callable, Sequence

from lmjax.config import ConfigError

RUNNERS = ("DirectRunner", "DataflowRunner", "SparkRunner", "FlinkRunner", "PortableRunner")
_INSTALL = "install it with `pip install 'lmjax[prepare]'` (apache-beam)"


def _beam():
    try:
        import apache_beam
    except ImportError:
        raise ConfigError(
            f"`lmjax data prepare` runs on Apache Beam, which is not installed: {_INSTALL}."
        ) from None
    return apache_beam


def _check_runner(runner: str, workers: int, store_root: str) -> None:
    """A ConfigError for a runner, worker count or store root that cannot work together."""
    if runner not in RUNNERS:
        raise ConfigError(
            f"--beam-runner={runner!r} is not a runner lmjax knows: choose one of "
            f"{', '.join(RUNNERS)}."
        )
    if workers < 1:
        raise ConfigError(f"--workers={workers}: give 1 or more DirectRunner worker processes.")
    if workers > 1 and runner != "DirectRunner":
        raise ConfigError(
            f"--workers={workers} sizes the DirectRunner only: size {runner}'s "
            "workers with its own --beam-options (e.g. --num_workers / "
            "--max_num_workers on Dataflow) and leave --workers at 1."
        )
    if runner == "DataflowRunner" and "://" not in store_root:
        raise ConfigError(
            f"Dataflow workers cannot write the local store root {store_root!r}: "
            "set data.store_dir=gs://BUCKET/PATH."
        )


def pipeline_options(runner: str, workers: int, options: str, store_root: str):
    """Beam PipelineOptions for `runner`; every mistake is a ConfigError raised before any work.

    options: extra pipeline flags as one shell-quoted string ("--project=p --region=r").
    """
    _check_runner(runner, workers, store_root)
    try:
        flags = shlex.split(options)
    except ValueError as e:
        raise ConfigError(
            f"--beam-options {options!r} cannot be split like a shell line ({e}): "
            "quote it as one argument, e.g. --beam-options '--project=p "
            "--region=r'."
        ) from None
    beam = _beam()
    known = set(beam.options.pipeline_options.PipelineOptions([]).get_all_options())  # dests
    for flag in flags:
        name = flag.split("=", 1)[0]
        if not name.startswith("--") or name[2:].removeprefix("no_") not in known:
            raise ConfigError(
                f"--beam-options: {flag!r} is not a Beam pipeline option: give "
                "--NAME=VALUE flags from Beam's PipelineOptions (see `python -m "
                "apache_beam.examples.wordcount --help`)."
            )
        if name == "--runner":
            raise ConfigError("--beam-options must not set --runner: use --beam-runner.")
    direct = (
        [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
        if workers > 1
        else ["--direct_running_mode=in_memory"]
    )
    # Beam's Python DirectRunner first tries its Prism runner, which downloads a binary from
    # GitHub at run time (no network on many clusters, and a surprise elsewhere), then falls
    # back to FnApiRunner: run that engine directly; it honours the direct_* options.
    engine = "FnApiRunner" if runner == "DirectRunner" else runner
    result = beam.options.pipeline_options.PipelineOptions(
        [f"--runner={engine}"] + (direct if runner == "DirectRunner" else []) + flags
    )
    try:
        result.get_all_options()
    except SystemExit:  # argparse rejected a value (its message is on stderr)
        raise ConfigError(
            f"--beam-options {options!r}: a value is invalid (see the message above)."
        ) from None
    return result


def run(fn: Callable, shards: Sequence, options) -> None:
    """Runs `fn` over `shards` (picklable, each call writes its own outputs) and waits."""
    beam = _beam()
    with beam.Pipeline(options=options) as pipeline:
        pipeline | "shards" >> beam.Create(list(shards)) | "prepare" >> beam.Map(fn)
