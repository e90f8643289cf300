"""`lmjax plan`: which mesh, per-chip batch and remat policy fit a TPU slice, and which is fastest.

Candidates are the product of a few dimensions (`DEFAULT_SPACE`, each replaceable with
`--sweep KEY=V1,V2`): the ICI mesh (data x fsdp x expert x tensor, fsdp taking the chips left), the
split of `--num-slices` between DCN data and DCN fsdp parallelism, sequences per chip, remat
policy and gradient accumulation; `--sweep` also adds any other config field as a dimension
(e.g. model.attention=splash,xla). Those the model's shapes or the mesh cannot
divide are rejected before any compile, with the reason. The rest are compiled ahead of time
for the target in worker processes (`compile.compile_train_step`, the real train step), each
with a timeout; a candidate that fails is reported with its error, never fatal. Each compiled
candidate gets its memory per chip from the compiler and a step time from `roofline.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from lmjax.config import Config, ConfigError, apply_overrides, parse_sweep, validate
from lmjax.hardware import parse_target
from lmjax.model import flops, transformer
from lmjax.observe import throughput
from lmjax.parallel import sharding
from lmjax.parallel.sharding import format_bytes
from lmjax.tools import aot, bench, roofline

GiB = 1024**3
SCHEMA = "lmjax.tools.plan/1"
# rows_per_chip: sequences per chip (global batch = rows_per_chip x all chips, as MaxText's
# per_device_batch_size). "-" in mesh.dcn_data means: all slices data-parallel.
DEFAULT_SPACE: dict[str, tuple[str, ...]] = {
    "mesh.data": ("1",),
    "mesh.expert": ("1",),  # MoE models: e.g. --sweep mesh.expert=1,8
    "mesh.tensor": ("1", "2"),
    "mesh.dcn_data": ("-",),
    "rows_per_chip": ("1", "2", "4"),
    "model.remat": ("full", "save_dots"),
    "optim.grad_accum": ("1",),
}
# Chinchilla (Hoffmann et al. 2022): compute-optimal training uses about 20 tokens per
# parameter, with training compute C = 6 N D.
CHINCHILLA_TOKENS_PER_PARAM = 20


@dataclasses.dataclass(frozen=True)
class Candidate:
    overrides: tuple[str, ...]  # the --set line that makes this candidate from the experiment
    config: Config


@dataclasses.dataclass(frozen=True)
class Rejected:
    overrides: tuple[str, ...]
    reason: str


def parse_sweeps(sweeps: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """["model.remat=full,none"] -> DEFAULT_SPACE with that dimension replaced."""
    return {**DEFAULT_SPACE, **dict(map(parse_sweep, sweeps))}


def _sharding_problem(config: Config, mesh_sizes: dict[str, int], rows: int) -> str | None:
    """The first parameter dimension (or the batch of `rows`) that the mesh axes its logical
    axis maps to (under the config's rules) do not divide; None when all divide."""
    rules = sharding.rules_from_config(config.mesh)
    leaves = jax.tree_util.tree_flatten_with_path(
        transformer.param_specs(config.model),
        is_leaf=lambda x: isinstance(x, transformer.ParamSpec),
    )[0]
    named = [("params/" + "/".join(k.key for k in path), v) for path, v in leaves]
    named.append(("batch", transformer.ParamSpec((rows,), ("act_batch",), "")))
    for name, spec in named:
        for size, axis in zip(spec.shape, spec.axes):
            mesh_axes = rules.get(axis, ())
            n = math.prod(mesh_sizes[a] for a in mesh_axes)
            if size % n:
                return (
                    f"{name} dimension {axis!r} of size {size} is not divisible by mesh "
                    f"axes {'+'.join(mesh_axes)} of size {n}"
                )
    return None


def _ici(point: dict[str, str]) -> tuple[int, int, int]:
    """(data, expert, tensor) of a point; fsdp takes the chips they leave."""
    return int(point["mesh.data"]), int(point.get("mesh.expert", "1")), int(point["mesh.tensor"])


def _mesh_problem(config: Config, chips: int, slices: int, point: dict[str, str]) -> str | None:
    """Why the mesh of `point` cannot hold `config` (None when it can)."""
    data, expert, tensor = _ici(point)
    dcn_data = slices if point["mesh.dcn_data"] == "-" else int(point["mesh.dcn_data"])
    if data < 1 or expert < 1 or tensor < 1 or chips % (data * expert * tensor):
        named = f"mesh.data x mesh.tensor = {data} x {tensor}"
        if expert != 1:
            named = f"mesh.data x mesh.expert x mesh.tensor = {data} x {expert} x {tensor}"
        return f"{named} does not divide {chips} chips per slice"
    if dcn_data < 1 or slices % dcn_data:
        return f"mesh.dcn_data={dcn_data} does not divide {slices} slices"
    accum = int(point["optim.grad_accum"])
    rows = int(point["rows_per_chip"]) * chips * slices
    if accum < 1 or rows % accum:
        return f"optim.grad_accum={accum} does not divide the batch of {rows} rows"
    sizes = {
        "data": data * dcn_data,
        "fsdp": chips // (data * expert * tensor) * (slices // dcn_data),
        "expert": expert,
        "tensor": tensor,
    }
    return _sharding_problem(config, sizes, rows // accum)


def _overrides(chips: int, slices: int, point: dict[str, str]) -> tuple[str, ...]:
    """The --set items of one point of the space (mesh and batch made explicit)."""
    data, expert, tensor = _ici(point)
    dcn_data = slices if point["mesh.dcn_data"] == "-" else int(point["mesh.dcn_data"])
    ici = data * expert * tensor
    fsdp = chips // ici if ici and chips % ici == 0 else -1
    items = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]
    if expert != 1:
        items.append(f"mesh.expert={expert}")
    if slices > 1:
        items += [f"mesh.dcn_data={dcn_data}", f"mesh.dcn_fsdp={slices // dcn_data}"]
    items.append(f"data.batch_size={int(point['rows_per_chip']) * chips * slices}")
    special = ("mesh.data", "mesh.expert", "mesh.tensor", "mesh.dcn_data", "rows_per_chip")
    items += [f"{k}={v}" for k, v in point.items() if k not in special]
    return tuple(items)


def enumerate_candidates(
    config: Config, chips: int, slices: int, space: dict[str, tuple[str, ...]]
) -> tuple[list[Candidate], list[Rejected]]:
    """Every point of `space` for `slices` slices of `chips` chips: the ones to compile, and
    the ones the shapes rule out (with the reason). Bad keys or values raise a ConfigError."""
    keys = list(space)
    candidates, rejected = [], []
    for values in itertools.product(*(space[k] for k in keys)):
        point = dict(zip(keys, values))
        try:
            problem = _mesh_problem(config, chips, slices, point)
        except ValueError:
            raise ConfigError(
                f"--sweep: {point} has a non-integer where a count is expected "
                "(mesh.*, rows_per_chip, optim.grad_accum)"
            ) from None
        overrides = _overrides(chips, slices, point)
        if problem:
            rejected.append(Rejected(overrides, problem))
            continue
        try:
            candidates.append(
                Candidate(overrides, validate(apply_overrides(config, list(overrides))))
            )
        except ConfigError as e:
            raise ConfigError(f"--sweep: {e}") from None
    return candidates, rejected


# ---------------------------------------------------------------- compiling in workers


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


# ---------------------------------------------------------------- estimates and ranking


def tpu_hardware(gen) -> roofline.Hardware:
    """The roofline's view of a `hardware.Generation` (the published per-chip figures)."""
    return roofline.Hardware(
        gen.peak_flops,
        gen.hbm_bytes_per_s,
        gen.ici_bytes_per_s,
        gen.dcn_bytes_per_s,
        overlapped=True,
    )


@dataclasses.dataclass(frozen=True)
class Row:
    outcome: Outcome
    estimate: roofline.Estimate | None  # None unless the compile succeeded
    measured_step_s: float = float("nan")  # `--measure` on this machine's devices

    @property
    def fits(self) -> bool:
        return self.outcome.status == "ok" and self.outcome.report.fits


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
            return (0, -row.estimate.tokens_per_s_per_chip)
        if row.estimate is not None:
            return (1, row.outcome.report.total_bytes)
        return (2, 0)

    return sorted(rows, key=key)


def _g(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3g}"


def _describe(overrides: Sequence[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in overrides)


def _cells(i: int, row: Row) -> tuple[str, ...]:
    """One line of `format_table`: candidate `i`, compiled and estimated."""
    r, e, d = row.outcome.report, row.estimate, _describe(row.outcome.candidate.overrides)
    mesh = "/".join(str(r.mesh_shape[a]) for a in ("data", "fsdp", "tensor"))
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
    that was not estimated and why."""
    head = (
        "#",
        "data/fsdp/tensor",
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
    lines = [_cells(i, row) for i, row in enumerate(rows, 1) if row.estimate is not None]
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


# ---------------------------------------------------------------- run length and budget


def run_length(
    step_s: float, tokens_per_step: int, chips: int, *, tokens: float = 0, days: float = 0
) -> dict:
    """Steps, wall time and chip-hours to train on `tokens` (or for `days`) at `step_s`."""
    if tokens <= 0 and days <= 0:
        raise ConfigError("give --tokens N or --days D (positive)")
    steps = math.ceil(tokens / tokens_per_step) if tokens > 0 else math.floor(days * 86400 / step_s)
    seconds = steps * step_s
    return {
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "wall_seconds": seconds,
        "days": seconds / 86400,
        "chip_hours": seconds / 3600 * chips,
    }


def compute_optimal(chip_hours: float, peak_flops: float, mfu: float) -> tuple[float, float]:
    """(parameters N, tokens D) that spend `chip_hours` at `mfu` of `peak_flops` per chip with
    C = 6 N D and D = CHINCHILLA_TOKENS_PER_PARAM x N."""
    budget = chip_hours * 3600 * peak_flops * mfu
    n = math.sqrt(budget / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return n, CHINCHILLA_TOKENS_PER_PARAM * n


def derived_shape(n_params: float, vocab_size: int) -> dict[str, int]:
    """A Llama shape of about `n_params` parameters: 128-wide heads, 4 query heads per KV
    head, MLP 3.5 x d_model (multiple of 256), depth d_model / 128 (per layer 13 x
    d_model^2 parameters with those ratios, plus 2 x vocab x d_model of embeddings)."""
    best: tuple[int, dict[str, int]] | None = None
    for d_model in range(256, 32769, 256):
        layers = max(2, d_model // 128)
        d_mlp = 256 * round(3.5 * d_model / 256)
        heads = max(1, d_model // 128)
        kv = max(1, heads // 4)
        n = (
            layers * (d_model * 128 * (2 * heads + 2 * kv) + 3 * d_model * d_mlp)
            + 2 * vocab_size * d_model
        )
        if best is None or abs(math.log(n / n_params)) < abs(math.log(best[0] / n_params)):
            best = (
                n,
                {
                    "model.d_model": d_model,
                    "model.n_layers": layers,
                    "model.n_heads": heads,
                    "model.n_kv_heads": kv,
                    "model.head_dim": 128,
                    "model.d_mlp": d_mlp,
                },
            )
    assert best is not None  # the loop runs at least once
    return best[1]


def budget_proposal(
    chip_hours: float, peak_flops: float, mfu: float, presets: dict[str, Any], vocab_size: int
) -> dict:
    """The compute-optimal N and D for the budget, the preset closest in N (with the tokens
    the budget buys it) and a derived shape. presets: {name: ModelConfig}."""
    n, d = compute_optimal(chip_hours, peak_flops, mfu)
    sizes = {name: transformer.count_params(cfg) for name, cfg in presets.items()}
    nearest = min(sizes, key=lambda k: abs(math.log(sizes[k] / n))) if sizes else None
    budget = chip_hours * 3600 * peak_flops * mfu
    return {
        "chip_hours": chip_hours,
        "mfu_assumed": mfu,
        "flops": budget,
        "optimal_params": n,
        "optimal_tokens": d,
        "tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM,
        "preset": nearest,
        "preset_params": sizes.get(nearest),
        "preset_tokens": budget / (6 * sizes[nearest]) if nearest else None,
        "derived_shape": derived_shape(n, vocab_size),
    }


# ---------------------------------------------------------------- the plan


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
            best.estimate.step_s,
            best.outcome.report.tokens_per_step,
            target_info["chips"],
            tokens=req.tokens,
            days=req.days,
        )
    if best and req.budget_chip_hours > 0:
        budget = budget_proposal(
            req.budget_chip_hours,
            hw.peak_flops,
            best.estimate.mfu,
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


def format_budget(b: dict) -> str:
    shape = " ".join(f"--set {k}={v}" for k, v in b["derived_shape"].items())
    head = (
        f"budget: {b['chip_hours']:,.0f} chip-hours at {100 * b['mfu_assumed']:.1f}% MFU "
        f"(the best candidate's estimate) = {b['flops']:.3g} FLOPs; compute-optimal with "
        f"C = 6 N D and D = {b['tokens_per_param']} N (Chinchilla): "
        f"N = {b['optimal_params']:.3g} parameters, D = {b['optimal_tokens']:.3g} tokens"
    )
    lines = [head]
    if b["preset"]:
        lines.append(
            f"  nearest preset: {b['preset']} ({b['preset_params']:.3g} parameters), "
            f"{b['preset_tokens']:.3g} tokens for the budget"
        )
    lines.append(f"  derived shape: {shape}")
    return "\n".join(lines)
