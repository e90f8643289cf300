"""`lmjax plan` from a Request: the target's hardware, the candidates enumerated, compiled
and ranked, and the run length or budget asked for; returns the JSON report and the text."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from lmjax.config import Config, ConfigError
from lmjax.hardware import parse_target
from lmjax.tools import roofline
from lmjax.tools.plan.budget import budget_proposal, format_budget, run_length
from lmjax.tools.plan.candidates import enumerate_candidates, parse_sweeps
from lmjax.tools.plan.rank import cpu_hardware, format_table, measure, rank, to_json, tpu_hardware
from lmjax.tools.plan.workers import compile_all


@dataclasses.dataclass(frozen=True)
class Request:
    """What a plan is asked: the target, the candidate space, and what to derive."""

    topology: str  # a Cloud TPU name or topology, or "cpu" for this machine's devices
    num_slices: int = 1
    sweeps: tuple[str, ...] = ()
    workers: int = 2
    timeout: float = 900.0
    xla_estimate: bool = False
    tokens: float = 0
    days: float = 0
    budget_chip_hours: float = 0
    measure: int = 0  # topology "cpu": time the best N fitting candidates (lmjax bench)


def _target(req: Request, compute_dtype: str) -> tuple[int, roofline.Hardware, dict]:
    """(chips per slice, the roofline's hardware, the target as the JSON report names it)."""
    if req.topology == "cpu":
        chips, info = jax.device_count(), {"accelerator": "cpu", "topology": "cpu"}
        hw = cpu_hardware(compute_dtype)
    else:
        target = parse_target(req.topology)
        chips, hw = target.chips, tpu_hardware(target.generation)
        info = {"accelerator": target.accelerator, "topology": target.topology}
    return chips, hw, {**info, "chips": chips * req.num_slices, "num_slices": req.num_slices}


def plan(
    config: Config,
    req: Request,
    presets: dict[str, Any] | None = None,
    progress: Callable[[int, int, int], None] = lambda done, total, failed: None,
) -> tuple[dict, str]:
    """Enumerates, compiles and ranks: (`to_json`'s dict, the text report). `progress(done,
    total, failed)` is called as each compile ends."""
    if req.workers < 1 or req.timeout <= 0 or req.num_slices < 1:
        raise ConfigError("--workers and --num-slices must be at least 1, --timeout positive")
    on_cpu = req.topology == "cpu"
    chips, hw, target_info = _target(req, config.model.dtype)
    space = parse_sweeps(req.sweeps)
    candidates, rejected = enumerate_candidates(config, chips, req.num_slices, space)
    outcomes = compile_all(
        candidates,
        None if on_cpu else req.topology,
        req.num_slices,
        workers=req.workers,
        timeout=req.timeout,
        xla_estimate=req.xla_estimate and not on_cpu,
        progress=progress,
    )
    rows = rank(outcomes, hw)
    if on_cpu and req.measure > 0:
        rows = measure(rows, req.measure)
    best = next((row for row in rows if row.fits), None)
    run = budget = None
    if best and (req.tokens > 0 or req.days > 0):
        run = run_length(
            best.estimated.step_s,
            best.outcome.report.tokens_per_step,
            target_info["chips"],
            tokens=req.tokens,
            days=req.days,
        )
    if best and req.budget_chip_hours > 0:
        budget = budget_proposal(
            req.budget_chip_hours,
            hw.peak_flops,
            best.estimated.mfu,
            presets or {},
            config.model.vocab_size,
        )
    text = [format_table(rows, rejected)]
    if run:
        text.append(
            f"run: {run['steps']:,} steps, {run['tokens']:.4g} tokens, "
            f"{run['days']:.2f} days, {run['chip_hours']:,.0f} chip-hours "
            f"({target_info['chips']} chips at the best candidate's estimated step)"
        )
    if budget:
        text.append(format_budget(budget))
    return to_json(rows, rejected, target=target_info, hw=hw, run=run, budget=budget), "\n".join(
        text
    )
