"""`lmjax plan`: compile candidate meshes, batches and remat policies, rank those that fit."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmjax.commands import aot, experiment
from lmjax.config import Config

if TYPE_CHECKING:
    from lmjax.tools.plan.search import Request


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="compile candidate meshes, batches and remat policies for a "
        "TPU slice; rank those that fit by estimated speed",
    )
    aot.add_target_arguments(
        p, "; cpu: this machine's jax devices, with its measured peak and memory bandwidth"
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="replace a dimension of the candidate space (repeatable): mesh.data, "
        "mesh.tensor, mesh.dcn_data, rows_per_chip, model.remat, "
        "optim.grad_accum; or add any config field, e.g. model.attention",
    )
    p.add_argument("--workers", type=int, default=2, help="compiles at once (processes)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per candidate")
    p.add_argument(
        "--xla-estimate",
        action="store_true",
        help="also the TPU compiler's optimal_seconds per step (two more small "
        "compiles per candidate)",
    )
    p.add_argument(
        "--tokens",
        type=float,
        default=0,
        help="turn the best candidate into a run of this many tokens",
    )
    p.add_argument("--days", type=float, default=0, help="... or of this many days")
    p.add_argument(
        "--budget-chip-hours",
        type=float,
        default=0,
        help="propose a compute-optimal model size and token count for this budget",
    )
    p.add_argument(
        "--measure",
        type=int,
        default=0,
        metavar="N",
        help="with --topology cpu: also time the best N candidates here",
    )
    p.add_argument("--json", action="store_true", help="print JSON (schema lmjax.tools.plan/1)")
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # as for compile: the TPU is described, not used
    from lmjax.tools.plan.search import Request

    config = experiment.load_experiment(args.experiment, args.overrides)
    presets = None
    if args.budget_chip_hours:
        presets = {
            name: experiment.load_experiment(name).model for name in experiment.experiment_names()
        }
    request = Request(
        args.topology,
        args.num_slices,
        tuple(args.sweep),
        args.workers,
        args.timeout,
        args.xla_estimate,
        args.tokens,
        args.days,
        args.budget_chip_hours,
        args.measure,
    )
    return main(config, request, presets, args.json)


def main(
    config: Config,
    request: Request,
    presets: dict[str, Any] | None = None,
    as_json: bool = False,
) -> int:
    """Prints the ranked table (or JSON, schema lmjax.tools.plan/1); exit 1 when nothing fits.
    `presets`: {experiment name: ModelConfig}, the model sizes a budget proposal may name."""
    from lmjax.tools.plan import search

    result, text = search.plan(config, request, presets, progress=_progress_bar(sys.stderr))
    print(json.dumps(result, indent=2) if as_json else text, flush=True)
    return 0 if any(c["fits"] for c in result["candidates"]) else 1


def _progress_bar(stream) -> Callable[[int, int, int], None]:
    """A one-line bar of the compiles done, redrawn in place on a terminal."""
    start = time.monotonic()
    tty = stream.isatty()

    def show(done: int, total: int, failed: int) -> None:
        bar = "#" * (20 * done // total) + "-" * (20 - 20 * done // total)
        line = (
            f"plan [{bar}] {done}/{total} compiled ({failed} failed) "
            f"{time.monotonic() - start:.0f} s"
        )
        print(
            ("\r" if tty else "") + line,
            end="" if tty and done < total else "\n",
            file=stream,
            flush=True,
        )

    return show
