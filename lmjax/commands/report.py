"""`lmjax report`: where a run's time went, across its restarts, and a PNG of it."""

from __future__ import annotations

import argparse
import os

from lmjax.workdir_names import REPORT


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report",
        help="where a run's time went (goodput, across restarts) and "
        "a PNG of loss, throughput and the time buckets",
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--png", default="", help="where to write the plot (default WORKDIR/report.png)")
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    return main(args.workdir, args.png)


def main(workdir: str, png: str = "") -> int:
    """Prints the goodput totals and writes the plot (default WORKDIR/report.png)."""
    from lmjax.observe import report

    records = report.load(workdir)
    print(report.format_totals(records))
    print(f"plot: {report.plot(records, png or os.path.join(workdir, REPORT))}")
    return 0
