"""`lmjax report`: where a run's time went, across its restarts, and a PNG of it."""

from __future__ import annotations

import os

from lmjax.observe import report
from lmjax.workdir_names import REPORT


def main(workdir: str, png: str = "") -> int:
    """Prints the goodput totals and writes the plot (default WORKDIR/report.png)."""
    records = report.load(workdir)
    print(report.format_totals(records))
    print(f"plot: {report.plot(records, png or os.path.join(workdir, REPORT))}")
    return 0
