"""What `lmjax plan` makes of the compiles: each candidate's roofline step time (memory per
chip from the compiler), the ranking, the table, and the JSON report (`SCHEMA`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax

from lmjax.config import Config
from lmjax.model import flops
from lmjax.observe import throughput
from lmjax.parallel.sharding import format_bytes
from lmjax.tools import bench, roofline
from lmjax.tools.plan.candidates import Rejected
from lmjax.tools.plan.workers import Outcome

SCHEMA = "lmjax.tools.plan/1"


def tpu_hardware(gen) -> roofline.Hardware:
    """The roofline's view of a `hardware.Generation` (the published per-chip figures)."""
    return roofline.Hardware(
        gen.peak_flops,
        gen.hbm_bytes_per_s,
        gen.ici_bytes_per_s,
        gen.dcn_bytes_per_s,
        overlapped=True,
    )


def cpu_hardware(compute_dtype: str) -> roofline.Hardware:
    """This machine as the roofline sees one of its jax CPU devices: the measured matmul peak
    and memory bandwidth (`metrics`), shared equally by the devices (they run on the same
    cores); collectives are copies at memory bandwidth; nothing overlaps."""
    n = jax.device_count()
    peak, _ = throughput.peak_flops(jax.devices()[0], compute_dtype)
    bandwidth = throughput.measured_cpu_bandwidth()
    return roofline.Hardware(
        peak / n, bandwidth / n, 2 * bandwidth / n, bandwidth / n, overlapped=False
    )


@dataclasses.dataclass(frozen=True)
class Row:
    outcome: Outcome
    estimate: roofline.Estimate | None  # None unless the compile succeeded
    measured_step_s: float = float("nan")  # `--measure` on this machine's devices

    @property
    def fits(self) -> bool:
        return self.outcome.status == "ok" and self.outcome.report.fits

    @property
    def estimated(self) -> roofline.Estimate:
        """The estimate of a candidate that compiled; an error for one that did not."""
        if self.estimate is None:
            raise ValueError(f"{self.outcome.candidate.overrides} did not compile: no estimate")
        return self.estimate


def estimate_step(report, config: Config, hw: roofline.Hardware) -> roofline.Estimate:
    """The roofline estimate of one compiled candidate (per chip, per step)."""
    chips = math.prod(report.mesh_shape.values())
    tokens = report.tokens_per_step / chips
    recompute = flops.remat_recompute_flops_per_token(config.model, config.data.seq_len)
    return roofline.estimate(
        hw,
        model_flops=report.model_flops,
        recompute_flops=recompute * tokens,
        traffic_bytes=roofline.traffic_bytes(
            report.argument_bytes, report.output_bytes, report.temp_bytes
        ),
        ici_bytes=report.ici_bytes,
        dcn_bytes=report.dcn_bytes,
        tokens=tokens,
    )


def rank(outcomes: Sequence[Outcome], hw: roofline.Hardware) -> list[Row]:
    """Fitting candidates fastest first (estimated tokens/s per chip), then those that
    compiled but do not fit (smallest first), then failures in candidate order."""
    rows = [
        Row(o, estimate_step(o.report, o.candidate.config, hw) if o.status == "ok" else None)
        for o in outcomes
    ]

    def key(row: Row):
        if row.fits:
            return (0, -row.estimated.tokens_per_s_per_chip)
        if row.estimate is not None:
            return (1, row.outcome.report.total_bytes)
        return (2, 0)

    return sorted(rows, key=key)


def measure(rows: Sequence[Row], n: int, steps: int = 5) -> list[Row]:
    """`rows` with the median step time of the first `n` fitting ones measured here (the
    real step on a synthetic batch, `bench.bench_step`)."""
    out, left = [], n
    for row in rows:
        if row.fits and left > 0:
            seconds = bench.bench_step(row.outcome.candidate.config, steps)["step_s"]
            row, left = dataclasses.replace(row, measured_step_s=seconds), left - 1
        out.append(row)
    return out


def _g(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def _describe(overrides: Sequence[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in overrides)


def _cells(i: int, row: Row, axes: Sequence[str]) -> tuple[str, ...]:
    """One line of `format_table`: candidate `i`, compiled and estimated, its mesh given as
    the sizes of `axes`."""
    r, e, d = row.outcome.report, row.estimated, _describe(row.outcome.candidate.overrides)
    mesh = "/".join(str(r.mesh_shape.get(a, 1)) for a in axes)
    chips = math.prod(r.mesh_shape.values())
    batch = int(d["data.batch_size"])
    return (
        str(i),
        mesh,
        f"{batch} ({batch / chips:g})",
        d.get("model.remat", "-"),
        d.get("optim.grad_accum", "1"),
        format_bytes(r.total_bytes),
        ("" if r.fits else "-") + format_bytes(abs(r.hbm_bytes - r.total_bytes)),
        "yes" if r.fits else "NO",
        f"{r.compile_seconds:.0f}",
        f"{e.step_s:.3g}",
        f"{e.tokens_per_s_per_chip:,.0f}",
        f"{100 * e.mfu:.1f}%",
        e.bound,
        _g(row.outcome.xla_step_s),
        _g(row.measured_step_s),
    )


def format_table(rows: Sequence[Row], rejected: Sequence[Rejected]) -> str:
    """The ranked table, the --set line of the best fitting candidate, then every candidate
    that was not estimated and why. The mesh column names the expert axis when a candidate
    has one."""
    estimated = [(i, row) for i, row in enumerate(rows, 1) if row.estimate is not None]
    expert = any(row.outcome.report.mesh_shape.get("expert", 1) > 1 for _, row in estimated)
    axes = ("data", "fsdp", "expert", "tensor") if expert else ("data", "fsdp", "tensor")
    head = (
        "#",
        "/".join(axes),
        "batch (/chip)",
        "remat",
        "accum",
        "memory/chip",
        "headroom",
        "fits",
        "compile s",
        "step s",
        "tok/s/chip",
        "MFU",
        "bound",
        "xla step s",
        "measured s",
    )
    lines = [_cells(i, row, axes) for i, row in estimated]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()
    out = [fmt(head), *map(fmt, lines)]
    best = next((row for row in rows if row.fits), None)
    out.append(
        "best: "
        + (
            " ".join(f"--set {o}" for o in best.outcome.candidate.overrides)
            if best
            else "no candidate fits"
        )
    )
    failed = [
        (row.outcome.candidate.overrides, f"{row.outcome.status}: {row.outcome.reason}")
        for row in rows
        if row.estimate is None
    ]
    failed += [(r.overrides, f"rejected before compiling: {r.reason}") for r in rejected]
    for overrides, why in failed:
        out.append(f"not estimated: {' '.join(overrides)}\n    {why}")
    return "\n".join(out)


def _record(index: int, row: Row) -> dict:
    o = row.outcome
    record = {
        "rank": index,
        "overrides": list(o.candidate.overrides),
        "status": o.status,
        "reason": o.reason,
        "fits": row.fits,
        "memory": None,
        "compile_seconds": None,
        "estimate": None,
        "measured_step_seconds": _or_none(row.measured_step_s),
    }
    if row.estimate is not None:
        r, e = o.report, row.estimate
        record["memory"] = {
            "total_bytes": r.total_bytes,
            "hbm_bytes": r.hbm_bytes,
            "headroom_bytes": r.hbm_bytes - r.total_bytes,
            "argument_bytes": r.argument_bytes,
            "output_bytes": r.output_bytes,
            "alias_bytes": r.alias_bytes,
            "temp_bytes": r.temp_bytes,
        }
        record["compile_seconds"] = r.compile_seconds
        record["estimate"] = {
            "step_seconds": e.step_s,
            "compute_seconds": e.compute_s,
            "memory_seconds": e.memory_s,
            "ici_seconds": e.ici_s,
            "dcn_seconds": e.dcn_s,
            "bound": e.bound,
            "mfu": e.mfu,
            "tokens_per_second_per_chip": e.tokens_per_s_per_chip,
            "xla_step_seconds": _or_none(o.xla_step_s),
        }
    return record


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def to_json(
    rows: Sequence[Row],
    rejected: Sequence[Rejected],
    *,
    target: dict,
    hw: roofline.Hardware,
    run: dict | None,
    budget: dict | None,
) -> dict:
    """The plan as a JSON-able dict; `SCHEMA` names its layout, which changes only with it."""
    records = [_record(i, row) for i, row in enumerate(rows, 1)]
    records += [
        {
            "rank": None,
            "overrides": list(r.overrides),
            "status": "rejected",
            "reason": r.reason,
            "fits": False,
            "memory": None,
            "compile_seconds": None,
            "estimate": None,
            "measured_step_seconds": None,
        }
        for r in rejected
    ]
    return {
        "schema": SCHEMA,
        "target": target,
        "hardware": dataclasses.asdict(hw),
        "candidates": records,
        "run": run,
        "budget": budget,
    }
