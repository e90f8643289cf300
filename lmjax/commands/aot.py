"""`lmjax compile`: does the train step fit a TPU topology? Compiled ahead of time with libtpu."""

from __future__ import annotations

from lmjax.config import Config
from lmjax.hardware import parse_target
from lmjax.tools import aot


def main(config: Config, topology: str, num_slices: int = 1) -> int:
    """Compiles, prints the report, returns the exit code (0 fits, 1 does not fit)."""
    try:
        report = aot.compile_train_step(config, parse_target(topology), num_slices)
    except aot.DoesNotFit as e:
        print(e, flush=True)
        return 1
    print(aot.format_report(report), flush=True)
    return 0 if report.fits else 1
