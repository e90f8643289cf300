"""`lmjax smoke`: is this machine ready to train? The checks of `lmjax.tools.smoke`, and the report."""

from __future__ import annotations

import argparse
import tempfile

from lmjax.commands import doctor, experiment
from lmjax.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("smoke", help="check this machine end to end: train, resume, generate")
    experiment.add_arguments(p, default="smoke")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", default="", help="where to keep the runs (default: a temp dir)")
    doctor.add_expect_platform(p)
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    config = experiment.load_experiment(args.experiment, args.overrides)
    return main(config, args.steps, args.workdir, args.expect_platform)


def main(config: Config, steps: int, workdir: str = "", expect_platform: str = "") -> int:
    """Joins the job's processes, runs the checks (in a new temporary directory unless
    `workdir`), prints the report; exit 0 when all pass."""
    from lmjax.parallel import distributed
    from lmjax.tools import smoke

    distributed.initialize()
    workdir = workdir or tempfile.mkdtemp(prefix="lmjax-smoke-")
    checks = smoke.run_checks(config, steps, workdir, expect_platform)
    print(smoke.report(checks, workdir))
    return 0 if all(c.ok for c in checks) else 1
