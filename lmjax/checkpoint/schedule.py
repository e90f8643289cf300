"""When to save and when to stop: SIGTERM/SIGINT handling and the save schedule, agreed by
all processes at the same step."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax.config import CheckpointConfig

log = logging.getLogger("lmjax")


class StopSignals:
    """While active, SIGTERM and SIGINT ask the run to save and stop at the next step
    boundary; a second signal exits at once (the default action of that signal)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning(
            "received %s: saving at the next step boundary, then exiting (send it "
            "again to exit at once)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # None: a handler installed outside Python (jax's preemption notifier), which
            # cannot be reinstalled from here; the default action is the safe fallback.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


class SaveSchedule:
    """Decides at each step boundary whether to save and whether to stop; all processes reach
    the same decision at the same step.

    Saves at multiples of every_steps and keep_every, after every_minutes since the last save
    (process 0's clock), at the last step, and when stopping on a signal or a JAX preemption
    notice. With several processes, local requests are combined by a tiny all-reduce that is
    read one step later (like the metrics), so the host never waits on the device for it.
    """

    def __init__(self, cfg: CheckpointConfig, total_steps: int, signals: StopSignals):
        self.cfg = cfg
        self.total = total_steps
        self.signals = signals
        self.last_save = time.monotonic()
        self._reduce = _make_flag_reduce() if jax.process_count() > 1 else None
        self._pending: jax.Array | None = (
            None  # the all-reduced [stop, time_due] of the previous boundary
        )

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def _local_flags(self) -> np.ndarray:
        time_due = (
            self.cfg.every_minutes > 0
            and jax.process_index() == 0
            and time.monotonic() - self.last_save >= 60 * self.cfg.every_minutes
        )
        return np.array([self.signals.received is not None, time_due], np.int32)

    def __call__(self, step: int) -> tuple[bool, bool]:
        """(save, stop) after `step` updates."""
        try:
            preempted = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off
            preempted = False
        if self._reduce is None:
            stop, time_due = (bool(x) for x in self._local_flags())
        else:
            agreed, self._pending = self._pending, self._reduce(self._local_flags())
            flags = np.zeros(2, np.int32) if agreed is None else np.asarray(agreed)
            stop, time_due = bool(flags[0]), bool(flags[1])
        stop = stop or preempted
        save = (
            stop
            or time_due
            or step == self.total
            or step % self.cfg.every_steps == 0
            or (self.cfg.keep_every > 0 and step % self.cfg.keep_every == 0)
        )
        return save, stop


def _make_flag_reduce() -> Callable[[np.ndarray], jax.Array]:
    """flags: int32 [k] per process -> a (not yet fetched) global element-wise max [k]."""
    mesh = Mesh(np.asarray(jax.devices()), ("all",))
    rows = NamedSharding(mesh, P("all"))
    reduce = jax.jit(lambda x: jnp.max(x, axis=0), out_shardings=NamedSharding(mesh, P()))

    def dispatch(flags: np.ndarray) -> jax.Array:
        local = np.tile(flags[None], (jax.local_device_count(), 1))
        return reduce(
            jax.make_array_from_process_local_data(
                rows, local, (jax.device_count(), flags.shape[0])
            )
        )

    return dispatch
