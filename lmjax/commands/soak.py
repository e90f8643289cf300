"""`lmjax soak`: SIGKILL training at chosen moments, resume, and count the bitwise-equal runs."""

from __future__ import annotations

import argparse

from lmjax import storage
from lmjax.commands import experiment


def add_parser(sub) -> None:
    p = sub.add_parser(
        "soak",
        help="kill soak: SIGKILL training at random moments (in a save, "
        "in the first save, between saves), resume, compare losses "
        "bit for bit with an uninterrupted run; prints N/N",
    )
    experiment.add_arguments(p, default="smoke")
    p.add_argument("--workdir", required=True, help="where the reference and trial runs go")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--steps", type=int, default=12, help="steps per run (checkpoints every 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random kill moments")
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    return main(args.workdir, args.trials, args.experiment, args.overrides, args.steps, args.seed)


def main(
    root: str, trials: int, experiment: str, overrides: list[str], steps: int, seed: int
) -> int:
    """Prints one line per trial and `N/N trials resumed bit for bit`; exit 1 unless all did."""
    from lmjax.tools import soak

    rows = soak.soak(
        storage.path(root),
        trials,
        experiment,
        overrides,
        steps=steps,
        seed=seed,
        on_trial=lambda i, row: print(soak.format_row(i, row), flush=True),
    )
    passed = sum(r["ok"] for r in rows)
    cut = sum(r["save_cut"] for r in rows)
    print(f"{passed}/{len(rows)} trials resumed bit for bit ({cut} kills cut a save in flight)")
    return 0 if passed == len(rows) else 1
