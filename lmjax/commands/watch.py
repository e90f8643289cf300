"""The progress watchdog of the offline commands that may run as several processes (`eval`,
`generate`, `checkpoint export`, `convert to-hf`): `--watchdog-seconds S` (default 3600, 0:
off) for each phase a command names (the restore, the evaluation or generation, the writes).
Started as several processes, one hung in I/O keeps its peers waiting in a collective forever;
past the deadline it dumps every thread's stack and exits 75 (`lmjax.train.watchdog`), and so
do they, each in its own deadline."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from lmjax.config import ConfigError

DEFAULT_SECONDS = 3600.0


def add_flag(p) -> None:
    p.add_argument(
        "--watchdog-seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help="a phase (the restore, the work, the writes) that takes longer dumps every "
        "thread's stack and exits 75; 0: off (default %(default)g)",
    )


@contextlib.contextmanager
def watching(seconds: float) -> Iterator[Callable[[str], None]]:
    """`expect(phase)`: from now on the command waits for `phase` (read after "waiting
    for"), within `seconds`; the watch starts at the first call and ends with the block."""
    from lmjax.train import watchdog

    if seconds < 0:
        raise ConfigError(f"--watchdog-seconds={seconds:g}: give 0 (off) or a positive number.")
    with watchdog.offline(seconds) as dog:
        yield dog.expect
