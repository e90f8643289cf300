"""The training loop: a short driver that dispatches steps and tells hooks what happened.

For each step k (the k-th update), in this order:
  before_step(k)                 before step k is dispatched
  on_metrics(k - 1, values, s)   step k-1's metrics as host floats, fetched while step k runs,
                                 so the host never waits on the device between dispatches;
                                 `s`: seconds between the ends of two successive steps
  after_step(k, state, metrics)  step k is dispatched (its metrics are still device arrays);
                                 a hook returning True stops the run after step k
  at_boundary(k, state)          only when some hook's `wants_boundary(k)` is True: after
                                 step k's metrics were delivered (evaluation runs here)
and once at the end `on_end(state, stopped)` (not after an exception), then `close()`.
Every call of a hook runs inside the goodput bucket named by its `bucket` attribute.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator

import jax

from lmjax.observe import goodput


class Hook:
    """A no-op for every event; subclasses override the events their one job needs."""

    bucket = "train"

    def before_step(self, step: int) -> None:
        pass

    def on_metrics(self, step: int, values: dict[str, float], seconds: float) -> None:
        pass

    def after_step(self, step: int, state: Any, metrics: dict) -> bool:
        return False

    def wants_boundary(self, step: int) -> bool:
        return False

    def at_boundary(self, step: int, state: Any) -> None:
        pass

    def on_end(self, state: Any, stopped: bool) -> None:
        pass

    def close(self) -> None:
        pass


def fetch(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


class _Hooks:
    """Calls one event on every hook that overrides it, each inside its goodput bucket."""

    def __init__(self, hooks: list[Hook], clock: goodput.Clock):
        self.hooks, self.clock = hooks, clock

    def __call__(self, event: str, *args) -> list:
        out = []
        for h in self.hooks:
            if getattr(type(h), event) is not getattr(Hook, event):
                with self.clock(h.bucket):
                    out.append(getattr(h, event)(*args))
        return out

    def wants_boundary(self, step: int) -> bool:
        return any(h.wants_boundary(step) for h in self.hooks)

    def close(self) -> None:
        self("close")


def run(
    step_fn: Callable,
    state: Any,
    batches: Iterator,
    total: int,
    hooks: list[Hook],
    clock: goodput.Clock,
    *,
    redo_until: int = 0,
) -> tuple[Any, bool]:
    """Trains from `state` up to `total` steps; returns (state, stopped early by a hook).

    batches: yields global batches; steps up to `redo_until` were reached before a restart
    and are charged to the `lost` bucket instead of `train`."""
    call = _Hooks(hooks, clock)
    try:
        return _drive(step_fn, state, batches, total, call, clock, redo_until)
    finally:
        call.close()


def _drive(
    step_fn, state, batches, total, call: _Hooks, clock: goodput.Clock, redo_until: int
) -> tuple[Any, bool]:
    work = lambda k: "lost" if k <= redo_until else "train"
    step, pending, stopped, first = int(state.step), None, False, True
    last = time.perf_counter()

    def deliver():
        nonlocal last
        done, metrics = pending
        with clock(work(done)):
            values = fetch(metrics)
        now = time.perf_counter()
        call("on_metrics", done, values, now - last)
        last = now

    while step < total and not stopped:
        step += 1
        call("before_step", step)
        with clock("data"):
            batch = next(batches)
        # The first dispatch compiles the step: start-up ends when it returns.
        with clock("startup" if first else work(step)):
            state, metrics = step_fn(state, batch)
        clock.set_base("train")
        first = False
        if pending is not None:
            deliver()
        pending = (step, metrics)
        stopped = any(call("after_step", step, state, metrics))
        if stopped or call.wants_boundary(step):
            deliver()
            pending = None
            if not stopped:
                call("at_boundary", step, state)
                last = time.perf_counter()
    if pending is not None:
        deliver()
    call("on_end", state, stopped)
    return state, stopped
