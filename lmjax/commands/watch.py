"""The progress watchdog of the offline commands that may run as several processes (`eval`,
`generate`, `checkpoint export`, `convert to-hf`): `--watchdog-seconds S` (default 3600, 0:
off) for each phase a command names (the restore, the evaluation or generation, the writes).
Started as several processes, one hung in I/O keeps its peers waiting in a collective forever;
past the deadline it dumps every thread's stack and exits 75 (`lmjax.train.watchdog`), and so
do they, each in its own deadline."""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator

DEFAULT_SECONDS = 3600.0
RERUN = "rerun the same command"


def add_flag(p) -> None:
    p.add_argument(
        "--watchdog-seconds",
        type=_seconds,
        default=DEFAULT_SECONDS,
        help="a phase (the restore, the work, the writes) that takes longer dumps every "
        "thread's stack and exits 75; 0: off (default %(default)g)",
    )


def _seconds(text: str) -> float:
    """argparse's type for the flag: refused at parsing, before any process joins a job."""
    seconds = float(text)
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text}: give 0 (off) or a positive number")
    return seconds


def rerun_into(out: str) -> str:
    """The advice for a command that writes OUT, which refuses a partly written OUT."""
    return f"delete {out} (it may be partly written), then {RERUN}"


@contextlib.contextmanager
def watching(seconds: float, rerun: str = RERUN) -> Iterator[Callable[[str], None]]:
    """`expect(phase)`: from now on the command waits for `phase` (read after "waiting
    for"), within `seconds`; the watch starts at the first call and ends with the block.
    `rerun`: what the stall's message tells the user to do."""
    from lmjax.train import watchdog

    with watchdog.offline(seconds, rerun) as dog:
        yield dog.expect
