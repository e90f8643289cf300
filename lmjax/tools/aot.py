"""Ahead-of-time compiles of the real train step for a Cloud TPU topology, on any machine.

`lmjax compile --experiment NAME --topology v5p-128` builds compile-only TPU devices with
libtpu (`jax.experimental.topologies`), makes the run's mesh over them, lowers the jitted
train step of `trainer_lib.make_trainer` with sharded `ShapeDtypeStruct`s and compiles it. The
report gives per-chip memory against the chip's HBM, FLOPs per step and the compile time;
a step that does not fit is an error (exit code 1) before any TPU time is paid for.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import math
import os
import re
import time

import jax

from lmjax.batch import abstract_batch
from lmjax.checkpoint import checkpointer
from lmjax.config import Config, ConfigError
from lmjax.config_checks import validate
from lmjax.hardware import Target
from lmjax.model import flops
from lmjax.parallel import sharding
from lmjax.parallel.sharding import format_bytes
from lmjax.tools import hlo
from lmjax.train import trainer as trainer_lib

GiB = 1024**3


def require_libtpu() -> None:
    """Raises a ConfigError naming the fix when libtpu (the TPU compiler) is not installed."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if (path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None:
        return
    raise ConfigError(
        "compiling for TPU needs libtpu (the TPU compiler), which is not installed: "
        "pip install 'lmjax[tpu]' (or pip install libtpu), or set "
        "TPU_LIBRARY_PATH to libtpu.so"
    )


def topology_devices(target: Target, num_slices: int = 1) -> list:
    """Compile-only TPU devices of `num_slices` slices of `target` (they carry slice_index
    when num_slices > 1)."""
    require_libtpu()
    # Without these, libtpu probes the GCE metadata server for a real TPU VM at start-up and
    # prints warnings; the compile describes `target`, not this machine.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # libtpu otherwise takes a machine-wide lock meant for real chips: compile-only devices
    # need no exclusivity, so concurrent compiles (and tests) on one machine may proceed.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    kwargs: dict[str, str | int] = dict(target.generation.libtpu_kwargs)
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    return list(
        topologies.get_topology_desc(
            topology_name=target.topology, platform="tpu", **kwargs
        ).devices
    )


class DoesNotFit(Exception):
    """The TPU compiler itself ran out of HBM (no memory breakdown is available then)."""


@dataclasses.dataclass(frozen=True)
class CompileReport:
    target: Target | None  # None: this machine's CPU devices
    num_slices: int
    mesh_shape: dict
    hbm_bytes: int  # per chip (per CPU device: its share of the RAM)
    argument_bytes: int  # per chip: state and batch
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments
    temp_bytes: int
    compile_seconds: float  # wall clock, lowering included
    compile_cpu_seconds: float  # this process's CPU time (the wall clock on an idle machine)
    xla_flops: float  # per chip per step, XLA's cost analysis: loop bodies counted once
    xla_optimal_seconds: float  # the TPU compiler's own estimate (nan elsewhere); loops once
    model_flops: float  # per chip per step, from flops.flops_per_token
    tokens_per_step: int
    # tpu_custom_call ops (Pallas kernels) by kernel name: splash attention's, megablox's gmm
    # and tgmm (the grouped matmuls of dropless MoE); a scanned layer's counted once.
    pallas_kernels: dict[str, int]
    ici_bytes: float  # per chip per step, sent by collectives within a slice (roofline.py)
    dcn_bytes: float  # ... by collectives whose groups span slices

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def pallas_calls(self) -> int:
        return sum(self.pallas_kernels.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.hbm_bytes


def compile_train_step(config: Config, target: Target | None, num_slices: int = 1) -> CompileReport:
    """Lowers and compiles `trainer_lib.make_trainer(config, mesh).step_fn` for `target`, or for
    this machine's devices when `target` is None.

    For a TPU target, `model.attention`, `model.matmul` and `model.moe_matmul` "auto" resolve
    as they would on the TPU (splash, xla, megablox), not as on the CPU that compiles.
    """
    if num_slices < 1:
        raise ConfigError(f"--num-slices={num_slices} must be at least 1")
    if target is not None:
        m = config.model
        on_tpu = dataclasses.replace(
            m,
            attention="splash" if m.attention == "auto" else m.attention,
            matmul="xla" if m.matmul == "auto" else m.matmul,
            moe_matmul="megablox" if m.moe_matmul == "auto" else m.moe_matmul,
        )
        config = dataclasses.replace(config, model=on_tpu)
    config = validate(config)
    devices = topology_devices(target, num_slices) if target else jax.devices()
    mesh = sharding.make_mesh(config.mesh, devices)
    trainer = trainer_lib.make_trainer(config, mesh)
    state = checkpointer.abstract_state(trainer.init_fn, trainer.state_shardings)
    rows = config.data.batch_size
    # Raises a ConfigError naming the numbers when the mesh does not divide the batch.
    sharding.logical_to_spec(("act_batch", None), trainer.rules, mesh, (rows, config.data.seq_len))
    batch = abstract_batch(rows, config.data.seq_len, trainer.batch_sharding)
    hbm = (
        target.generation.hbm_bytes
        if target
        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(devices)
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        compiled = trainer.step_fn.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) or target is None:
            raise
        raise DoesNotFit(
            f"DOES NOT FIT on {target.accelerator} "
            f"({hbm / GiB:.0f} GiB HBM per chip): the TPU "
            f"compiler says {str(e).splitlines()[0]}"
        ) from None
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return _report(config, target, num_slices, mesh, hbm, compiled, seconds, cpu_seconds)


# An HLO instruction calling a Pallas TPU kernel: "%gmm.8 = bf16[...] custom-call(...),
# custom_call_target="tpu_custom_call"": the kernel's name before the instruction's number.
_PALLAS_CALL = re.compile(
    r"%([A-Za-z_][\w-]*?)(?:\.\d+)? = [^\n]*custom_call_target=\"tpu_custom_call\""
)


def _report(
    config: Config,
    target: Target | None,
    num_slices: int,
    mesh,
    hbm: int,
    compiled,
    seconds: float,
    cpu_seconds: float,
) -> CompileReport:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = config.data.batch_size * config.data.seq_len
    hlo_text = compiled.as_text()
    pallas_kernels = collections.Counter(m.group(1) for m in _PALLAS_CALL.finditer(hlo_text))
    model_flops = flops.flops_per_token(config.model, config.data.seq_len) * tokens / mesh.size
    slice_of = [getattr(d, "slice_index", 0) for d in mesh.devices.flat]
    sent = hlo.collectives(hlo_text, slice_of)
    return CompileReport(
        target,
        num_slices,
        dict(mesh.shape),
        hbm,
        memory.argument_size_in_bytes,
        memory.output_size_in_bytes,
        memory.alias_size_in_bytes,
        memory.temp_size_in_bytes,
        seconds,
        cpu_seconds,
        float(cost.get("flops", float("nan"))),
        float(cost.get("optimal_seconds", float("nan"))),
        model_flops,
        tokens,
        dict(pallas_kernels),
        sum(c.bytes_sent for c in sent if not c.crosses_slices),
        sum(c.bytes_sent for c in sent if c.crosses_slices),
    )


def format_report(r: CompileReport) -> str:
    """A short table: memory per chip against HBM, FLOPs, compile time, verdict."""
    hbm = r.hbm_bytes
    slices = f" x {r.num_slices} slices" if r.num_slices > 1 else ""
    where = f"{r.target.accelerator} ({r.target.topology}{slices})" if r.target else "cpu"
    chips = r.target.chips * r.num_slices if r.target else math.prod(r.mesh_shape.values())
    lines = [
        f"target     {where}, {chips} chips, mesh {r.mesh_shape}",
        f"compile    {r.compile_seconds:.1f} s wall, {r.compile_cpu_seconds:.1f} s CPU",
        "memory per chip",
        f"  arguments {format_bytes(r.argument_bytes):>12}   (params, optimizer state, batch)",
        f"  outputs   {format_bytes(r.output_bytes):>12}   ({format_bytes(r.alias_bytes)} aliased "
        "to donated arguments)",
        f"  temps     {format_bytes(r.temp_bytes):>12}",
        f"  total     {format_bytes(r.total_bytes):>12}   of {hbm / GiB:.0f} GiB HBM "
        f"({100 * r.total_bytes / hbm:.1f}%)",
        f"FLOPs per chip per step: {r.model_flops:.4g} (model: 6N + attention, "
        f"{r.tokens_per_step} tokens per step); XLA cost analysis {r.xla_flops:.4g} (counts each "
        "scanned layer once, attention kernels not at all)",
        f"Pallas kernel calls: {r.pallas_calls}"
        + "".join(f", {name} {n}" for name, n in sorted(r.pallas_kernels.items())),
        "fits"
        if r.fits
        else f"DOES NOT FIT: {r.total_bytes / GiB:.2f} GiB > {hbm / GiB:.0f} GiB HBM",
    ]
    return "\n".join(lines)
