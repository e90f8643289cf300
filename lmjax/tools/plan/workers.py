"""The compiles of `lmjax plan`: every candidate's real train step compiled ahead of time for
the target (`aot.compile_train_step`) in its own spawned process, at most `workers` at once and
each under a timeout; a candidate that fails gets its error as its Outcome, never fatal."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from lmjax.config import Config, ConfigError
from lmjax.hardware import parse_target
from lmjax.tools import aot
from lmjax.tools.plan.candidates import Candidate


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One candidate after its compile: status "ok", "does_not_fit" (the compiler ran out of
    HBM), "rejected" (a configuration error), "error" or "timeout"."""

    candidate: Candidate
    status: str
    reason: str = ""
    report: Any = None  # compile.CompileReport when status == "ok"
    xla_step_s: float = float("nan")  # the compiler's optimal_seconds, loops corrected


def _compile_in_worker(
    conn, config: Config, topology: str | None, num_slices: int, xla_estimate: bool
) -> None:
    """Runs in a spawned process: compiles one candidate, sends (status, reason, report, xla)."""
    try:
        target = parse_target(topology) if topology else None
        report = aot.compile_train_step(config, target, num_slices)
        xla = xla_step_seconds(config, target, num_slices) if xla_estimate else float("nan")
        conn.send(("ok", "", report, xla))
    except aot.DoesNotFit as e:
        conn.send(("does_not_fit", str(e), None, float("nan")))
    except ConfigError as e:
        conn.send(("rejected", str(e).replace("\n", " "), None, float("nan")))
    except Exception as e:  # any compiler failure is this candidate's result
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        conn.send(("error", f"{type(e).__name__}: {first}"[:300], None, float("nan")))
    conn.close()


def xla_step_seconds(config: Config, target, num_slices: int) -> float:
    """The TPU compiler's `optimal_seconds` for the whole step.

    Its cost analysis sees the body of a loop once (a scanned stack of layers costs one
    layer), so the step is compiled twice more, unrolled with 1 and 2 layers and one
    microbatch: step = grad_accum x (t1 + (n_layers - 1) x (t2 - t1)). This repeats the
    optimizer update once per microbatch, a small overcount when grad_accum > 1.
    """
    accum = config.optim.grad_accum
    times = []
    for layers in (1, 2):
        one = dataclasses.replace(
            config,
            model=dataclasses.replace(config.model, n_layers=layers, scan_layers=False),
            data=dataclasses.replace(config.data, batch_size=config.data.batch_size // accum),
            optim=dataclasses.replace(config.optim, grad_accum=1),
        )
        times.append(aot.compile_train_step(one, target, num_slices).xla_optimal_seconds)
    return accum * (times[0] + (config.model.n_layers - 1) * (times[1] - times[0]))


@contextlib.contextmanager
def _cpu_only_environment():
    """JAX_PLATFORMS=cpu (unless set) in the environment a process started inside inherits;
    the caller's own environment is restored after.

    The workers compile for a described target, never for this machine's accelerators. jax
    reads JAX_PLATFORMS when it is imported, which a spawned worker does before its target
    runs, so the setting must be in the environment it starts with."""
    if "JAX_PLATFORMS" in os.environ:
        yield
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        yield
    finally:
        del os.environ["JAX_PLATFORMS"]


def compile_all(
    candidates: Sequence[Candidate],
    topology: str | None,
    num_slices: int,
    *,
    workers: int,
    timeout: float,
    xla_estimate: bool = False,
    progress: Callable[[int, int, int], None] = lambda done, total, failed: None,
) -> list[Outcome]:
    """Compiles every candidate in at most `workers` spawned processes at once; a process
    still running after `timeout` seconds is killed and its candidate marked "timeout"."""
    ctx = multiprocessing.get_context("spawn")
    pending = list(candidates)
    running: dict[Any, Any] = {}
    outcomes: dict[Any, Any] = {}
    while pending or running:
        while pending and len(running) < workers:
            cand = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_compile_in_worker,
                daemon=True,
                args=(child, cand.config, topology, num_slices, xla_estimate),
            )
            with _cpu_only_environment():
                proc.start()
            child.close()
            running[cand] = (proc, parent, time.monotonic())
        for cand, (proc, conn, started) in list(running.items()):
            outcome = _poll(cand, proc, conn, started, timeout)
            if outcome is not None:
                del running[cand]
                outcomes[cand] = outcome
                progress(
                    len(outcomes), len(candidates), sum(o.status != "ok" for o in outcomes.values())
                )
        time.sleep(0.2)
    return [outcomes[c] for c in candidates]


def _poll(cand: Candidate, proc, conn, started: float, timeout: float) -> Outcome | None:
    """The outcome of a finished (or timed-out) worker; None while it is still working."""
    if conn.poll():
        try:
            status, reason, report, xla = conn.recv()
        except EOFError:
            status, reason, report, xla = "error", "", None, float("nan")
        proc.join()
        if status == "error" and not reason:
            reason = f"the compile process died (exit code {proc.exitcode})"
        return Outcome(cand, status, reason, report, xla)
    if not proc.is_alive():
        proc.join()
        return Outcome(
            cand,
            "error",
            f"the compile process died (exit code {proc.exitcode}, out of host memory?)",
        )
    if time.monotonic() - started > timeout:
        proc.kill()
        proc.join()
        return Outcome(cand, "timeout", f"no result within --timeout={timeout:g} s")
    return None
