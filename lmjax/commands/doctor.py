"""`lmjax doctor`: joins the job's processes, runs the preflight checks of `lmjax train`
(`lmjax.tools.doctor`) and prints them; exit 0 when all pass."""

from __future__ import annotations

import argparse

from lmjax.commands import experiment
from lmjax.config import Config


def add_expect_platform(p: argparse.ArgumentParser) -> None:
    """--expect-platform, which `lmjax doctor` and `lmjax smoke` check."""
    p.add_argument(
        "--expect-platform",
        choices=["", "cpu", "gpu", "tpu"],
        default="",
        help="fail unless jax runs on this platform (catches a silent CPU fallback)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="the preflight checks of `lmjax train`, nothing compiled: versions, devices, "
        "mesh, attention kernel, writable dirs, and that every process of the job agrees",
    )
    experiment.add_arguments(p, default="smoke")
    p.add_argument(
        "--workdir", default="", help="the run directory to check (local or gs://; default: none)"
    )
    add_expect_platform(p)
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    config = experiment.load_experiment(args.experiment, args.overrides)
    return main(config, args.workdir, args.expect_platform)


def main(config: Config, workdir: str = "", expect_platform: str = "") -> int:
    from lmjax.parallel import distributed
    from lmjax.tools import checklist, doctor

    started = distributed.initialize()
    checks = doctor.run_checks(config, workdir, started.num_processes, expect_platform)
    failed = sum(not c.ok for c in checks)
    print("\n".join(["lmjax doctor report", *checklist.lines(checks)]))
    print(f"{failed} check(s) FAILED" if failed else "all checks passed", flush=True)
    return 1 if failed else 0
