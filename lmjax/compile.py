"""Ahead-of-time compiles of the real train step for a Cloud TPU topology, on any machine.

`lmjax compile --experiment NAME --topology v5p-128` builds compile-only TPU devices with
libtpu (`jax.experimental.topologies`), makes the run's mesh over them, lowers the jitted
train step of `train.make_trainer` with sharded `ShapeDtypeStruct`s and compiles it. The
report gives per-chip memory against the chip's HBM, FLOPs per step and the compile time;
a step that does not fit is an error (exit code 1) before any TPU time is paid for.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time

from lmjax.config import Config, ConfigError
from lmjax.sharding import format_bytes

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TpuFamily:
    prefix: str  # topology-name prefix understood by libtpu, e.g. "v5p"
    name_units_per_chip: int  # Cloud names count TensorCores (2 per chip) or chips
    hbm_bytes: int  # per chip
    dims: int  # 3 (torus of v4/v5p) or 2 (v5e/v6e)
    topology_kwargs: tuple[tuple[str, str], ...] = ()


TPU_FAMILIES = {
    "v4": TpuFamily("v4", 2, 32 * GiB, 3, (("chip_config_name", "megacore"),)),
    "v5p": TpuFamily("v5p", 2, 95 * GiB, 3),
    "v5litepod": TpuFamily("v5e", 1, 16 * GiB, 2),
    "v5e": TpuFamily("v5e", 1, 16 * GiB, 2),
    "v6e": TpuFamily("v6e", 1, 32 * GiB, 2),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice to compile for: `topology` as libtpu names it (e.g. "v5p:4x4x4")."""
    accelerator: str  # Cloud name, e.g. "v5p-128"
    topology: str
    chips: int
    family: TpuFamily


def default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's default slice shape for a power-of-two chip count:
    (4, 2) -> (2, 2); (64, 3) -> (4, 4, 4); (32, 3) -> (2, 4, 4); (128, 2) -> (8, 16)."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"{chips} chips: only power-of-two slices have a default shape; give the "
                          f"topology explicitly, e.g. --topology v5p:4x4x12")
    shape = [1] * dims
    if dims == 3 and chips >= 4:
        shape, chips = [2, 2, 1], chips // 4
    while chips > 1:
        last_min = max(i for i, s in enumerate(shape) if s == min(shape))
        shape[last_min] *= 2
        chips //= 2
    return tuple(shape)


def parse_target(text: str) -> Target:
    """A Cloud TPU name ("v5p-128", "v4-64", "v5litepod-16", "v5e-4", "v6e-256") or a libtpu
    topology ("v5p:4x4x4", "v5e:2x2") -> Target. v4/v5p names count TensorCores (two per
    chip); v5e/v6e names count chips."""
    text = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    t = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    family_name = (m or t).group(1) if (m or t) else None
    if family_name not in TPU_FAMILIES:
        raise ConfigError(f"--topology {text!r}: expected a Cloud TPU name like v5p-128, v4-64, "
                          f"v5litepod-16, v6e-256 or a topology like v5p:4x4x4; families "
                          f"{sorted(TPU_FAMILIES)}")
    family = TPU_FAMILIES[family_name]
    if t:
        shape = tuple(int(x) for x in t.group(2).split("x"))
        if len(shape) != family.dims:
            raise ConfigError(f"--topology {text!r}: {family_name} topologies have {family.dims} "
                              f"dimensions, e.g. {family.prefix}:{'x'.join(['2'] * family.dims)}")
        chips = math.prod(shape)
        name = f"{family_name}-{chips * family.name_units_per_chip}"
    else:
        units = int(m.group(2))
        if units % family.name_units_per_chip:
            raise ConfigError(f"--topology {text!r}: {family_name}-N counts TensorCores, two per "
                              "chip, so N must be even")
        chips = units // family.name_units_per_chip
        shape, name = default_shape(chips, family.dims), text
    return Target(name, f"{family.prefix}:{'x'.join(map(str, shape))}", chips, family)


def require_libtpu() -> None:
    """Raises a ConfigError naming the fix when libtpu (the TPU compiler) is not installed."""
    path = os.environ.get("TPU_LIBRARY_PATH")
    if (path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None:
        return
    raise ConfigError("compiling for TPU needs libtpu (the TPU compiler), which is not installed: "
                      "pip install 'lmjax[tpu]' (or pip install libtpu), or set "
                      "TPU_LIBRARY_PATH to libtpu.so")


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
    kwargs = dict(target.family.topology_kwargs)
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    return list(topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                             **kwargs).devices)


class DoesNotFit(Exception):
    """The TPU compiler itself ran out of HBM (no memory breakdown is available then)."""


@dataclasses.dataclass(frozen=True)
class CompileReport:
    target: Target
    num_slices: int
    mesh_shape: dict
    argument_bytes: int  # per chip: state and batch
    output_bytes: int
    alias_bytes: int  # outputs written in place of donated arguments
    temp_bytes: int
    compile_seconds: float  # wall clock, lowering included
    compile_cpu_seconds: float  # this process's CPU time (the wall clock on an idle machine)
    xla_flops: float  # per chip per step, XLA's cost analysis: loop bodies counted once
    model_flops: float  # per chip per step, from metrics.flops_per_token
    tokens_per_step: int
    pallas_calls: int  # tpu_custom_call ops (Pallas kernels such as splash attention)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.target.family.hbm_bytes


def compile_train_step(config: Config, target: Target, num_slices: int = 1) -> CompileReport:
    """Lowers and compiles `train.make_trainer(config, mesh).step_fn` for `target`.

    `model.attention` and `model.matmul` "auto" resolve as they would on the TPU (splash,
    xla), not as on the CPU that compiles.
    """
    import jax

    from lmjax import metrics, sharding, train
    from lmjax.config import validate

    if num_slices < 1:
        raise ConfigError(f"--num-slices={num_slices} must be at least 1")
    on_tpu = {k: v for k, v in (("attention", "splash"), ("matmul", "xla"))
              if getattr(config.model, k) == "auto"}
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, **on_tpu))
    config = validate(config)
    devices = topology_devices(target, num_slices)
    mesh = sharding.make_mesh(config.mesh, devices)
    trainer = train.make_trainer(config, mesh)
    state = jax.eval_shape(trainer.init_fn)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                         state, trainer.state_shardings)
    rows = config.data.batch_size
    # Raises a ConfigError naming the numbers when the mesh does not divide the batch.
    sharding.logical_to_spec(("act_batch", None), trainer.rules, mesh, (rows, config.data.seq_len))
    batch = {k: jax.ShapeDtypeStruct((rows, config.data.seq_len), "int32",
                                     sharding=trainer.batch_sharding) for k in train.BATCH_KEYS}
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        compiled = trainer.step_fn.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise DoesNotFit(f"DOES NOT FIT on {target.accelerator} "
                         f"({target.family.hbm_bytes / GiB:.0f} GiB HBM per chip): the TPU "
                         f"compiler says {str(e).splitlines()[0]}") from None
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens = rows * config.data.seq_len
    pallas_calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    model_flops = metrics.flops_per_token(config.model, config.data.seq_len) * tokens / len(devices)
    return CompileReport(target, num_slices, dict(mesh.shape), memory.argument_size_in_bytes,
                         memory.output_size_in_bytes, memory.alias_size_in_bytes,
                         memory.temp_size_in_bytes, seconds, cpu_seconds, float(cost.get("flops", float("nan"))),
                         model_flops, tokens, pallas_calls)


def format_report(r: CompileReport) -> str:
    """A short table: memory per chip against HBM, FLOPs, compile time, verdict."""
    hbm = r.target.family.hbm_bytes
    slices = f" x {r.num_slices} slices" if r.num_slices > 1 else ""
    lines = [
        f"target     {r.target.accelerator} ({r.target.topology}{slices}), "
        f"{r.target.chips * r.num_slices} chips, mesh {r.mesh_shape}",
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
        f"Pallas kernel calls (splash attention): {r.pallas_calls}",
        "fits" if r.fits else f"DOES NOT FIT: {r.total_bytes / GiB:.2f} GiB > {hbm / GiB:.0f} GiB HBM",
    ]
    return "\n".join(lines)


def main(config: Config, topology: str, num_slices: int = 1) -> int:
    """Compiles, prints the report, returns the exit code (0 fits, 1 does not fit)."""
    try:
        report = compile_train_step(config, parse_target(topology), num_slices)
    except DoesNotFit as e:
        print(e, flush=True)
        return 1
    print(format_report(report), flush=True)
    return 0 if report.fits else 1
