"""The training loop's built-in hooks (`lmjax.train.loop`), one job each.

They share two sinks: the `MetricsWriter` (WORKDIR/metrics/, TensorBoard, the progress line;
silent on processes other than 0) and `summary`, the dict `train()` returns (the latest
value of every step metric, the last evaluation, the sample, where a stop happened).
Saves and evaluations run inside `busy(kind)`, the progress watchdog's allowance for them
(`lmjax.train.watchdog`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from typing import Callable, ContextManager

import jax

from lmjax.observe import goodput, metrics as metrics_lib, throughput
from lmjax.train import loop
from lmjax.train.loop import Hook

log = logging.getLogger("lmjax")


class Rewind(Exception):
    """`LossGuard` rejected step `step` (its loss `loss`): the run goes back to its newest
    checkpoint and skips the batch that step read (`lmjax.train.run`)."""

    def __init__(self, step: int, loss: float, reason: str):
        super().__init__(reason)
        self.step, self.loss, self.reason = step, loss, reason


class LossGuard(Hook):
    """Judges each step's loss once, when its metrics arrive or, earlier, before it is saved
    (`check`), so that no checkpoint holds a rejected step.

    A non-finite loss or gradient: on_nonfinite=stop raises FloatingPointError, skip warns
    (the step already kept the old parameters), rewind raises `Rewind`. With spike_factor > 0
    a finite loss above spike_factor x the mean of the last `SPIKE_WINDOW` accepted losses
    (once `SPIKE_WARMUP` were seen) raises `Rewind` too. After max_rewinds rewinds the next
    rejection raises FloatingPointError instead.
    """

    SPIKE_WINDOW, SPIKE_WARMUP = 20, 5

    def __init__(self, on_nonfinite: str, spike_factor: float, max_rewinds: int):
        self.on_nonfinite, self.spike_factor, self.max_rewinds = (
            on_nonfinite,
            spike_factor,
            max_rewinds,
        )
        self.accepted: collections.deque[tuple[int, float]] = collections.deque(
            maxlen=self.SPIKE_WINDOW
        )
        self.judged, self.rewinds = 0, 0

    def on_metrics(self, step, values, seconds):
        self._judge(step, values)

    def check(self, step: int, metrics: dict) -> None:
        """Judges step `step` from its device metrics (before its save)."""
        self._judge(step, loop.fetch({k: metrics[k] for k in ("loss", "grad_norm", "finite")}))

    def rewound(self, step: int) -> None:
        """The run went back to step `step`: later steps will be judged again."""
        self.rewinds += 1
        self.judged = step
        while self.accepted and self.accepted[-1][0] > step:
            self.accepted.pop()

    def _judge(self, step: int, values: dict[str, float]) -> None:
        if step <= self.judged:
            return
        self.judged, loss = step, values["loss"]
        if not values["finite"]:
            self._nonfinite(step, values)
        elif self.spike_factor and len(self.accepted) >= self.SPIKE_WARMUP:
            mean = sum(x for _, x in self.accepted) / len(self.accepted)
            if loss > self.spike_factor * mean:
                self._reject(
                    step,
                    loss,
                    f"loss {loss:.4g} at step {step} is above checkpoint.spike_factor="
                    f"{self.spike_factor:g} x the mean of the last {len(self.accepted)} "
                    f"steps ({mean:.4g})",
                )
        self.accepted.append((step, loss))

    def _nonfinite(self, step: int, values: dict[str, float]) -> None:
        message = (
            f"non-finite loss or gradient at step {step}: loss={values['loss']}, "
            f"grad_norm={values['grad_norm']}"
        )
        if self.on_nonfinite == "rewind":
            self._reject(step, values["loss"], message)
        if self.on_nonfinite == "stop":
            raise FloatingPointError(message)
        log.warning("%s; skipped the update (checkpoint.on_nonfinite=skip)", message)

    def _reject(self, step: int, loss: float, reason: str) -> None:
        if self.rewinds >= self.max_rewinds:
            raise FloatingPointError(
                f"{reason}; gave up after checkpoint.max_rewinds="
                f"{self.max_rewinds} rewinds. Every checkpoint is in place: lower optim.lr or "
                "inspect the data, then rerun the same command."
            )
        raise Rewind(step, loss, reason)


class StepMetrics(Hook):
    """Adds step time, throughput and MFU to each step's metrics, keeps them in `summary`,
    and writes every `log_every`-th step and the last with device and host memory."""

    def __init__(
        self,
        writer: metrics_lib.MetricsWriter,
        summary: dict,
        rates: throughput.Throughput,
        log_every: int,
        total: int,
    ):
        self.writer, self.summary, self.rates = writer, summary, rates
        self.log_every, self.total = log_every, total

    def on_metrics(self, step, values, seconds):
        values = {k: v for k, v in values.items() if k != "finite"}
        values.update(step_seconds=seconds, **self.rates(seconds))
        self.summary.update(values)
        if step % self.log_every == 0 or step == self.total:
            self.writer.write(step, {**values, **throughput.memory_usage()})


class Checkpoints(Hook):
    """Saves when the `SaveSchedule` says so (every N steps or minutes, the last step, a stop
    signal or preemption notice) and stops the run after a stop request's save. `check`
    (the `LossGuard`'s) judges each step before it is saved."""

    bucket = "checkpoint"

    def __init__(
        self,
        ckpt,
        schedule,
        data_state,
        meta: dict,
        skip_nonfinite: bool,
        clock: goodput.Clock,
        summary: dict,
        busy: Callable[[str], ContextManager] = contextlib.nullcontext,
        check: Callable[[int, dict], None] = lambda step, metrics: None,
    ):
        self.ckpt, self.schedule, self.data_state, self.meta = ckpt, schedule, data_state, meta
        self.skip_nonfinite, self.clock, self.summary = skip_nonfinite, clock, summary
        self.busy, self.check = busy, check

    def after_step(self, step, state, metrics):
        self.ckpt.poll()
        save, stop = self.schedule(step)
        if save:
            with self.busy("save"):
                self._save(step, state, metrics)
            self.schedule.saved()
        return stop

    def _save(self, step, state, metrics):
        with self.clock("train"):  # waiting for the step in flight is not save overhead
            jax.block_until_ready(metrics["finite"])
        self.check(step, metrics)  # the loss guard judges the step before it is kept
        self.ckpt.save(
            step,
            state,
            data_state=self.data_state(step),
            meta=self.meta,
            step_finite=metrics["finite"],
            allow_nonfinite_step=self.skip_nonfinite,
        )

    def on_end(self, state, stopped):
        if stopped:
            step = int(state.step)
            log.warning(
                "stopped at step %d after a signal; checkpoint saved, rerun the same "
                "command to resume",
                step,
            )
            self.summary["stopped_at_step"] = float(step)

    def close(self):
        self.ckpt.close()


class Evaluation(Hook):
    """Evaluates every `every` steps (0: only at the end) and at the last step."""

    bucket = "eval"

    def __init__(
        self,
        evaluate,
        writer: metrics_lib.MetricsWriter,
        summary: dict,
        every: int,
        total: int,
        busy: Callable[[str], ContextManager] = contextlib.nullcontext,
    ):
        self.evaluate, self.writer, self.summary = evaluate, writer, summary
        self.every, self.total, self.busy = every or total, total, busy

    def wants_boundary(self, step):
        return step % self.every == 0 or step == self.total

    def at_boundary(self, step, state):
        with self.busy("evaluation"):
            result = self.evaluate(state.params)
        self.writer.write(step, result)
        self.summary.update(result)


class EndSample(Hook):
    """After a run that was not stopped early: a greedy sample, logged and in `summary`."""

    bucket = "eval"

    def __init__(self, sample, summary: dict):
        self.sample, self.summary = sample, summary

    def on_end(self, state, stopped):
        if not stopped:
            self.summary["sample"] = self.sample(state.params)


class Profile(Hook):
    """A jax.profiler trace of steps [start, end) into `log_dir`/plugins/profile/ (the layout
    TensorBoard's profile plugin reads). The last traced step is waited for before the trace
    stops, so it is complete; the steps outside the window run unsynchronized as always."""

    bucket = "profile"

    def __init__(self, start: int, end: int, log_dir: str):
        self.start, self.end, self.log_dir = start, end, log_dir
        self.active = False

    def before_step(self, step):
        if step == self.start:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after_step(self, step, state, metrics):
        if self.active and step == self.end - 1:
            jax.block_until_ready((state, metrics))
            self.close()
        return False

    def close(self):
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
            log.info(
                "profile of steps %d-%d written to %s",
                self.start,
                self.end - 1,
                os.path.join(self.log_dir, "plugins", "profile"),
            )


class GoodputLog(Hook):
    """Writes the goodput clock's buckets (cumulative since this start) at every
    `log_every`-th step; `train()` writes `final()` last, however the run ends."""

    def __init__(
        self, clock: goodput.Clock, writer: metrics_lib.MetricsWriter, log_every: int, step: int
    ):
        self.clock, self.writer, self.log_every, self.step = clock, writer, log_every, step

    def on_metrics(self, step, values, seconds):
        self.step = step
        if step % self.log_every == 0:
            self.writer.write(step, self.clock.record(), progress=False)

    def final(self) -> tuple[int, dict]:
        return self.step, self.clock.record()
