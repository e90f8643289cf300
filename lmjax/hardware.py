"""Cloud TPU generations: one table of chip facts, and the parsers of slice names; GPU peaks
and shared memory.

`GENERATIONS` is the only place these facts live: `lmjax compile` and `lmjax plan` read HBM,
peaks and bandwidths from it; `launch/tpu.py` and `launch/gke.py` read host layout, GKE labels
and runtime versions. This module imports nothing heavy (the launchers run without jax).

Sources (Cloud TPU system-architecture pages, docs.cloud.google.com/tpu/docs/{v4,v5p,v5e,v6e}):
peak bf16 compute, HBM capacity and bandwidth, and inter-chip interconnect (ICI) bandwidth per
chip are the published figures; ICI is stored bidirectional (v5p: 1200 GB/s, published as
such; v5e/v6e publish one direction, 1600/3584 Gbps, doubled here). DCN is the host NIC
bandwidth divided among the host's chips (v5p publishes 50 Gbps per chip; v5e 2 x 100 Gbps
and v6e 4 x 200 Gbps per 8-chip host). v4 publishes neither ICI nor DCN per chip: its ICI is
6 links x 50 GB/s per direction from the TPU v4 paper (Jouppi et al., ISCA 2023), its DCN is
assumed equal to v5p's.
"""

from __future__ import annotations

import dataclasses
import math
import re

from lmjax.config import ConfigError

GiB = 1024**3
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # accelerator-type prefix in GCE/GKE names: "v5p" in "v5p-64"
    libtpu_name: str  # topology prefix libtpu understands: "v5e" for v5litepod
    cores_per_chip: int  # the number after the dash counts TensorCores (v4, v5p) or chips
    topology_dims: int  # 3 for v4/v5p (2x2x4), 2 for v5e/v6e (4x4)
    chips_per_host: int  # on multi-host slices
    max_single_host_chips: int
    gke_accelerator: str  # node label cloud.google.com/gke-tpu-accelerator
    runtime_version: str  # default TPU VM software version
    hbm_bytes: int  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # per chip, both directions, all ports
    dcn_bytes_per_s: float  # per chip: its share of the host NICs
    libtpu_kwargs: tuple[tuple[str, str], ...] = ()  # for jax.experimental.topologies


# A table, one generation a row, in the field order of `Generation`.
# fmt: off
GENERATIONS: dict[str, Generation] = {g.name: g for g in (
    Generation("v4", "v4", 2, 3, 4, 4, "tpu-v4-podslice", "tpu-ubuntu2204-base", 32 * GiB,
               275e12, 1200 * GB, 600 * GB, 50e9 / 8, (("chip_config_name", "megacore"),)),
    Generation("v5p", "v5p", 2, 3, 4, 4, "tpu-v5p-slice", "v2-alpha-tpuv5", 95 * GiB,
               459e12, 2765 * GB, 1200 * GB, 50e9 / 8),
    Generation("v5litepod", "v5e", 1, 2, 4, 8, "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite",
               16 * GiB, 197e12, 819 * GB, 2 * 1600e9 / 8, 2 * 100e9 / 8 / 8),
    Generation("v6e", "v6e", 1, 2, 4, 8, "tpu-v6e-slice", "v2-alpha-tpuv6e", 32 * GiB,
               918e12, 1640 * GB, 2 * 3584e9 / 8, 4 * 200e9 / 8 / 8),
)}
# fmt: on
# The generation behind each start of jax's `device.device_kind` on a TPU.
DEVICE_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5litepod",
    "TPU v5e": "v5litepod",
    "TPU v5p": "v5p",
    "TPU v5": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}
# Dense peak FLOP/s per chip by the start of `device.device_kind` (the longest matching
# prefix wins): (16-bit matmuls, float32 matmuls). TPUs run float32 matmuls at default
# precision as bfloat16 MXU passes, so both numbers are the bf16 peak; NVIDIA GPUs run them
# as TF32 on tensor cores (XLA's default), so the second number is the TF32 peak. H100 kinds
# are named in full: the PCIe and NVL cards are slower than SXM, and an unknown H100 variant
# reports no peak rather than a wrong one. TPU peaks come from `GENERATIONS` (by
# `DEVICE_KINDS`); GPU peaks are from NVIDIA's data sheets.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    **{kind: (GENERATIONS[g].peak_flops,) * 2 for kind, g in DEVICE_KINDS.items()},
    "NVIDIA A100": (312e12, 156e12),  # SXM and PCIe alike
    "NVIDIA L4": (121e12, 60e12),
    "NVIDIA H100 80GB HBM3": (989e12, 495e12),  # SXM5
    "NVIDIA H100 SXM": (989e12, 495e12),
    "NVIDIA H100 PCIe": (756e12, 378e12),
    "NVIDIA H100 NVL": (835e12, 418e12),
    "NVIDIA H200": (989e12, 495e12),  # SXM; the NVL card has its own row (longest prefix)
    "NVIDIA H200 NVL": (835e12, 418e12),
}
# Shared memory one thread block may use, in bytes, by NVIDIA compute capability (major * 10
# + minor): the opt-in maximum per block, 1 KiB under the per-SM capacity (the CUDA runtime
# keeps 1 KiB per block). Sources: the CUDA C++ Programming Guide's "Technical Specifications
# per Compute Capability" table and NVIDIA's tuning guides (docs.nvidia.com/cuda/
# {ampere,ada,hopper}-tuning-guide): 8.0 (A100) 164 KiB per SM, 163 per block; 8.6 (A10, RTX
# 30) and 8.9 (L4, L40, RTX 40) 100 KiB per SM, 99 per block; 9.0 (H100, H200) and 10.0
# (B200) 228 KiB per SM, 227 per block; 7.0 (V100) 96 KiB and 7.5 (T4) 64 KiB, all of it per
# block; 12.0 (RTX PRO Blackwell) 100 KiB per SM, 99 per block. The attention kernel sizes
# its tiles from this (`lmjax.model.flash_gpu`).
KiB = 1024
SHARED_MEMORY_PER_BLOCK: dict[int, int] = {
    70: 96 * KiB,
    75: 64 * KiB,
    80: 163 * KiB,
    86: 99 * KiB,
    89: 99 * KiB,
    90: 227 * KiB,
    100: 227 * KiB,
    120: 99 * KiB,
}


def shared_memory_per_block(compute_capability: int) -> int:
    """Bytes of shared memory a thread block may use on a GPU of `compute_capability` (e.g.
    90 for an H100); a capability missing from `SHARED_MEMORY_PER_BLOCK` gets the table's
    smallest budget, which every listed GPU has."""
    return SHARED_MEMORY_PER_BLOCK.get(compute_capability, min(SHARED_MEMORY_PER_BLOCK.values()))


# Other spellings `lmjax compile --topology` accepts (libtpu's and the marketing name).
ALIASES = {"v5e": "v5litepod"}


def generation_of(accelerator_type: str) -> tuple[Generation, int]:
    """("v5p-64") -> (v5p Generation, 64); raises ValueError naming the accepted forms."""
    prefix, sep, number = accelerator_type.rpartition("-")
    if not sep or prefix not in GENERATIONS or not number.isdigit() or int(number) < 1:
        raise ConfigError(
            f"accelerator type {accelerator_type!r}: expected PREFIX-N with PREFIX "
            f"one of {sorted(GENERATIONS)}, e.g. v5p-64, v5litepod-16, v6e-256, v4-32"
        )
    return GENERATIONS[prefix], int(number)


def default_shape(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's default slice shape for a power-of-two chip count:
    (4, 3) -> (2, 2, 1); (64, 3) -> (4, 4, 4); (32, 3) -> (2, 4, 4); (128, 2) -> (8, 16)."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(
            f"{chips} chips is not a power of two: only power-of-two slices have a "
            "default shape; give the topology explicitly, e.g. v5p:4x4x12"
        )
    shape = [1] * dims
    if dims == 3 and chips >= 4:
        shape, chips = [2, 2, 1], chips // 4
    while chips > 1:
        last_min = max(i for i, s in enumerate(shape) if s == min(shape))
        shape[last_min] *= 2
        chips //= 2
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class SliceShape:
    accelerator_type: str
    generation: Generation
    chips: int
    hosts: int
    chips_per_host: int
    topology: str  # "4x4x4" (v4/v5p) or "4x4" (v5e/v6e)


def slice_shape(accelerator_type: str, topology: str | None = None) -> SliceShape:
    """Chips, hosts and topology of one slice, e.g. v5p-64 -> 32 chips, 8 hosts, 2x4x4."""
    gen, number = generation_of(accelerator_type)
    if number % gen.cores_per_chip:
        raise ConfigError(
            f"{accelerator_type}: {gen.name} counts TensorCores "
            f"({gen.cores_per_chip} per chip), so N must be even"
        )
    chips = number // gen.cores_per_chip
    if topology is None:
        topology = "x".join(map(str, default_shape(chips, gen.topology_dims)))
    dims = topology.split("x")
    if (
        len(dims) != gen.topology_dims
        or not all(d.isdigit() for d in dims)
        or math.prod(map(int, dims)) != chips
    ):
        raise ConfigError(
            f"topology {topology!r} does not fit {accelerator_type} ({chips} chips "
            f"as {gen.topology_dims} dimensions, e.g. "
            f"{'2x2x4' if gen.topology_dims == 3 else '4x4'})"
        )
    per_host = chips if chips <= gen.max_single_host_chips else gen.chips_per_host
    if chips % per_host:
        raise ConfigError(f"{accelerator_type}: {chips} chips do not fill hosts of {per_host}")
    return SliceShape(accelerator_type, gen, chips, chips // per_host, per_host, topology)


@dataclasses.dataclass(frozen=True)
class Target:
    """A TPU slice to compile for: `topology` as libtpu names it (e.g. "v5p:4x4x4")."""

    accelerator: str  # Cloud name, e.g. "v5p-128"
    topology: str
    chips: int
    generation: Generation


def parse_target(text: str) -> Target:
    """A Cloud TPU name ("v5p-128", "v4-64", "v5litepod-16", "v5e-4", "v6e-256") or a libtpu
    topology ("v5p:4x4x4", "v5e:2x2") -> Target. v4/v5p names count TensorCores (two per
    chip); v5e/v6e names count chips."""
    text = text.strip().lower()
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    t = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    found = m or t
    name = found.group(1) if found else ""
    gen = GENERATIONS.get(ALIASES.get(name, name))
    if gen is None:
        raise ConfigError(
            f"--topology {text!r}: expected a Cloud TPU name like v5p-128, v4-64, "
            f"v5litepod-16, v6e-256 or a topology like v5p:4x4x4; families "
            f"{sorted([*GENERATIONS, *ALIASES])}"
        )
    if t:
        shape = tuple(int(x) for x in t.group(2).split("x"))
        if len(shape) != gen.topology_dims:
            raise ConfigError(
                f"--topology {text!r}: {name} topologies have {gen.topology_dims} "
                f"dimensions, e.g. {gen.libtpu_name}:"
                f"{'x'.join(['2'] * gen.topology_dims)}"
            )
        chips = math.prod(shape)
        accelerator = f"{name}-{chips * gen.cores_per_chip}"
    elif m:  # a generation was found, so one of the two patterns matched
        units = int(m.group(2))
        if units % gen.cores_per_chip:
            raise ConfigError(
                f"--topology {text!r}: {name}-N counts TensorCores, two per chip, so N must be even"
            )
        chips = units // gen.cores_per_chip
        shape, accelerator = default_shape(chips, gen.topology_dims), text
    return Target(accelerator, f"{gen.libtpu_name}:{'x'.join(map(str, shape))}", chips, gen)
