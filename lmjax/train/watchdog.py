"""The progress watchdog: a process that makes no progress within a deadline dumps the stack
of every thread (faulthandler) and exits with `STALL_EXIT`, so that `supervise`, SLURM or any
restart loop starts the job again from its last checkpoint.

It watches the whole run, `lmjax.train.run.train` from before the lease to after the last
save's commit. Progress is the end of a phase: each set-up phase (`expect` names them: the
lease, the mesh, the resume decision, the tokenizer and stores, the restore, the records and
evaluation windows), a shard of a data store prepared inline (`progress`: the phase's
deadline starts again), a completed step (its metrics reached the host), a finished save or
evaluation, the end of the run. A process stuck in I/O (a storage read without a timeout, a
wedged save, an NFS hang) keeps sending jax's heartbeats, so nothing else notices it; its
peers then wait in a collective forever, miss their own deadlines and exit the same way.

Deadlines, with f = run.watchdog_factor, m = run.watchdog_min_seconds and
s = run.watchdog_startup_seconds:
  - each set-up phase, the first step (it compiles the step) and the end of the run (the
    sample compiles; the last save commits in full): s. The lease: max(s, 2 x
    checkpoint.lease_timeout_s), as a run may wait for another host's lease to expire. The
    tokenizer and data stores: max(s, data.prepare_timeout_s), the time the other processes
    already wait for process 0 to prepare them;
  - waiting for a step: max(m, f * the longest of the last 100 step times);
  - inside a save or an evaluation: s the first time (the evaluation compiles), then
    max(m, f * the longest earlier one of its kind after the first).
The offline commands (`lmjax.commands.watch`) use `offline(seconds, rerun)`: one deadline for each
phase they name. A process that fires waits min(deadline, 10 s) before it exits: its peers, stuck behind it
in a collective and at most a few steps later in their own deadlines, dump their stacks too
before its exit breaks their collectives.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterator

from lmjax.config import RunConfig
from lmjax.train.loop import Hook

log = logging.getLogger("lmjax")

# EX_TEMPFAIL, as for a rendezvous timeout: a restart from the last checkpoint may succeed.
STALL_EXIT = 75
_STEP_HISTORY = 100
_EXIT_GRACE_S = 10.0


class Watchdog(Hook):
    """`expect(phase)` starts the watch (the first call) and names what comes next; as a loop
    hook it follows the steps, `busy(kind)` brackets a save or an evaluation, and `on_end`
    names the end of the run; `stop` ends the watch. enabled=False: never fires."""

    def __init__(
        self,
        factor: float,
        min_seconds: float,
        startup_seconds: float,
        *,
        enabled: bool = True,
        exit: Callable[[int], None] = os._exit,
        poll_seconds: float = 0.5,
        rerun: str = "rerun the same command to resume from the last checkpoint",
    ):
        self.factor, self.min_seconds, self.startup_seconds = factor, min_seconds, startup_seconds
        self.enabled, self._exit, self._poll, self._rerun = enabled, exit, poll_seconds, rerun
        self._steps: collections.deque[float] = collections.deque(maxlen=_STEP_HISTORY)
        self._done_steps = 0
        self._kinds: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self._since = time.monotonic()
        self._deadline, self._waiting = startup_seconds, "the first step (compiling)"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stepped = False

    def expect(self, waiting: str, deadline: float | None = None) -> None:
        """From now on the run is waiting for `waiting` (a phase's name, read after "waiting
        for"), within `deadline` seconds (None: run.watchdog_startup_seconds)."""
        self._reset(deadline or self.startup_seconds, waiting)
        if self._thread is None and self.enabled:
            self._thread = threading.Thread(target=self._watch, name="lmjax-watchdog", daemon=True)
            self._thread.start()

    def progress(self) -> None:
        """Progress inside the current phase (a data store's shard prepared): its deadline
        starts again."""
        with self._lock:
            self._since = time.monotonic()

    def before_step(self, step):
        if not self._stepped:
            self._stepped = True
            self.expect(f"step {step} (the first: compiling)")

    def on_metrics(self, step, values, seconds):
        self._done_steps += 1
        if self._done_steps > 1:  # the first step's time includes the compilation
            self._steps.append(seconds)
        self._reset(self._step_deadline(), f"step {step + 1}")

    @contextlib.contextmanager
    def busy(self, kind: str) -> Iterator[None]:
        """Brackets one save or evaluation; the step deadline applies again after it."""
        seen = self._kinds.setdefault(kind, [])
        later = seen[1:] or seen
        deadline = max(self.min_seconds, self.factor * max(later)) if later else None
        self._reset(deadline or self.startup_seconds, f"the {kind} to finish")
        start = time.monotonic()
        try:
            yield
        finally:
            seen.append(time.monotonic() - start)
            self._reset(self._step_deadline(), "the next step")

    def on_end(self, state, stopped):
        self.expect("the end of the run (the sample, the last save's commit)")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _step_deadline(self) -> float:
        if not self._steps:
            return self.startup_seconds
        return max(self.min_seconds, self.factor * max(self._steps))

    def _reset(self, deadline: float, waiting: str) -> None:
        with self._lock:
            self._since, self._deadline, self._waiting = time.monotonic(), deadline, waiting

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            with self._lock:
                idle, deadline, waiting = (
                    time.monotonic() - self._since,
                    self._deadline,
                    self._waiting,
                )
            if idle > deadline:
                self._fire(idle, deadline, waiting)
                return

    def _fire(self, idle: float, deadline: float, waiting: str) -> None:
        log.error(
            "watchdog: no progress for %.1f s (deadline %.1f s) while waiting for %s: dumping "
            "every thread's stack and exiting with code %d; %s",
            idle,
            deadline,
            waiting,
            STALL_EXIT,
            self._rerun,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        time.sleep(min(deadline, _EXIT_GRACE_S))
        self._exit(STALL_EXIT)


def watching(run: RunConfig) -> contextlib.AbstractContextManager[Watchdog]:
    """The run's watchdog (run.watchdog_factor=0: one that never fires), stopped on exit."""
    return _stopped(
        Watchdog(
            run.watchdog_factor,
            run.watchdog_min_seconds,
            run.watchdog_startup_seconds,
            enabled=run.watchdog_factor > 0,
        )
    )


def offline(seconds: float, rerun: str) -> contextlib.AbstractContextManager[Watchdog]:
    """An offline command's watchdog: `seconds` for each phase it names (`expect`), with no
    steps; 0: one that never fires. `rerun`: what its message tells the user to do. Stopped
    on exit."""
    dog = Watchdog(1.0, seconds, seconds, enabled=seconds > 0, rerun=rerun)
    return _stopped(dog)


@contextlib.contextmanager
def _stopped(dog: Watchdog) -> Iterator[Watchdog]:
    try:
        yield dog
    finally:
        dog.stop()
