"""Cloud TPU accelerator types: chips, hosts, topology and the names GCE/GKE use for them.

One table (`GENERATIONS`) is the single source of these facts for tpu.py and gke.py.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Generation:
    prefix: str              # accelerator-type prefix: "v5p" in "v5p-64"
    cores_per_chip: int      # the number after the dash counts TensorCores (v4, v5p) or chips
    chips_per_host: int      # on multi-host slices
    max_single_host_chips: int
    topology_dims: int       # 3 for v4/v5p (2x2x4), 2 for v5e/v6e (4x4)
    gke_accelerator: str     # node label cloud.google.com/gke-tpu-accelerator
    runtime_version: str     # default TPU VM software version


GENERATIONS: dict[str, Generation] = {g.prefix: g for g in (
    Generation("v4", 2, 4, 4, 3, "tpu-v4-podslice", "tpu-ubuntu2204-base"),
    Generation("v5p", 2, 4, 4, 3, "tpu-v5p-slice", "v2-alpha-tpuv5"),
    Generation("v5litepod", 1, 4, 8, 2, "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite"),
    Generation("v6e", 1, 4, 8, 2, "tpu-v6e-slice", "v2-alpha-tpuv6e"),
)}


@dataclasses.dataclass(frozen=True)
class SliceShape:
    accelerator_type: str
    generation: Generation
    chips: int
    hosts: int
    chips_per_host: int
    topology: str            # "4x4x4" (v4/v5p) or "4x4" (v5e/v6e)


def generation_of(accelerator_type: str) -> tuple[Generation, int]:
    """("v5p-64") -> (v5p Generation, 64); raises ValueError naming the accepted forms."""
    prefix, sep, number = accelerator_type.rpartition("-")
    if not sep or prefix not in GENERATIONS or not number.isdigit() or int(number) < 1:
        raise ValueError(f"accelerator type {accelerator_type!r}: expected PREFIX-N with PREFIX "
                         f"one of {sorted(GENERATIONS)}, e.g. v5p-64, v5litepod-16, v6e-256, v4-32")
    return GENERATIONS[prefix], int(number)


def default_topology(chips: int, dims: int) -> str:
    """The standard slice shape for a power-of-two chip count: 16 chips -> "2x2x4" or "4x4"."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"{chips} chips is not a power of two: give the topology explicitly")
    shape = [1] * dims
    for _ in range(int(math.log2(chips))):
        shape.sort()
        shape[0] *= 2
    text = "x".join(map(str, sorted(shape)))
    return _SPELLED.get(text, text)


# GCE and GKE write the single-host 3-D slice with the 1 last.
_SPELLED = {"1x2x2": "2x2x1"}


def slice_shape(accelerator_type: str, topology: str | None = None) -> SliceShape:
    """Chips, hosts and topology of one slice, e.g. v5p-64 -> 32 chips, 8 hosts, 2x4x4."""
    gen, number = generation_of(accelerator_type)
    if number % gen.cores_per_chip:
        raise ValueError(f"{accelerator_type}: {gen.prefix} counts TensorCores "
                         f"({gen.cores_per_chip} per chip), so N must be even")
    chips = number // gen.cores_per_chip
    if topology is None:
        topology = default_topology(chips, gen.topology_dims)
    dims = topology.split("x")
    if (len(dims) != gen.topology_dims or not all(d.isdigit() for d in dims)
            or math.prod(map(int, dims)) != chips):
        raise ValueError(f"topology {topology!r} does not fit {accelerator_type} ({chips} chips "
                         f"as {gen.topology_dims} dimensions, e.g. "
                         f"{'2x2x4' if gen.topology_dims == 3 else '4x4'})")
    per_host = chips if chips <= gen.max_single_host_chips else gen.chips_per_host
    if chips % per_host:
        raise ValueError(f"{accelerator_type}: {chips} chips do not fill hosts of {per_host}")
    return SliceShape(accelerator_type, gen, chips, chips // per_host, per_host, topology)
