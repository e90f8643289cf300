"""`lmjax compile`: does the train step fit a TPU topology? Compiled ahead of time with libtpu."""

from __future__ import annotations

import argparse
import os

from lmjax.commands import experiment
from lmjax.config import Config
from lmjax.hardware import parse_target


def add_target_arguments(p: argparse.ArgumentParser, more_help: str) -> None:
    """The experiment, and the TPU target it is compiled for (--topology, --num-slices)."""
    experiment.add_arguments(p)
    p.add_argument(
        "--topology",
        required=True,
        help="Cloud TPU name (v5p-128, v4-64, v5litepod-16, v6e-256) or a topology "
        "(v5p:4x4x4)" + more_help,
    )
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: number of slices")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="compile the train step for a TPU topology (libtpu) and "
        "report memory per chip; exit 1 if it does not fit",
    )
    add_target_arguments(p, "")
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    # The compile targets TPU devices described by libtpu; this machine's accelerators are not
    # needed, so unless told otherwise jax stays on the CPU instead of probing for a TPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    config = experiment.load_experiment(args.experiment, args.overrides)
    return main(config, args.topology, args.num_slices)


def main(config: Config, topology: str, num_slices: int = 1) -> int:
    """Compiles, prints the report, returns the exit code (0 fits, 1 does not fit)."""
    from lmjax.tools import aot

    try:
        report = aot.compile_train_step(config, parse_target(topology), num_slices)
    except aot.DoesNotFit as e:
        print(e, flush=True)
        return 1
    print(aot.format_report(report), flush=True)
    return 0 if report.fits else 1
