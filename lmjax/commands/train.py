"""`lmjax train`: joins the job's processes, runs the preflight checks (`lmjax doctor`'s), then
trains (or resumes) a run in its workdir."""

from __future__ import annotations

import argparse

from lmjax.commands import experiment
from lmjax.config import Config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) an experiment in a workdir")
    experiment.add_arguments(p)
    p.add_argument("--workdir", required=True, help="run directory (local or gs://)")
    p.add_argument(
        "--restore-from",
        metavar="DIR_OR_STEP",
        help="continue from a step of this workdir, or (in a workdir without "
        "checkpoints) from another run's checkpoints dir or checkpoints/STEP",
    )
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from these params only (a dir written by `lmjax checkpoint "
        "export` or `lmjax convert from-hf`), with a fresh optimizer",
    )
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    config = experiment.load_experiment(args.experiment, args.overrides)
    return main(config, args.workdir, args.restore_from, args.init_from)


def main(
    config: Config, workdir: str, restore_from: str | None = None, init_from: str | None = None
) -> int:
    """Prints the final losses (and the end-of-run sample); see `run.train` for the rest."""
    from lmjax.parallel import distributed
    from lmjax.tools import doctor
    from lmjax.train import run

    started = distributed.initialize()
    doctor.preflight(config, workdir, started.num_processes)
    result = run.train(config, workdir, restore_from=restore_from, init_from=init_from)
    print(" ".join(f"{k}={v:.4g}" for k, v in result.items() if k.startswith(("loss", "eval"))))
    if "sample" in result:
        print(f"sample: {result['sample']}")
    return 0
