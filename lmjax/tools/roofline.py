"""A roofline estimate of the train step's time on a chip, from a stated model.

Per chip and per step:
  compute    = (model FLOPs + the forward FLOPs the remat policy recomputes) / peak FLOP/s.
               The model FLOPs are `flops.flops_per_token` (6N + causal attention); XLA's
               cost analysis is not used because it counts the body of a scanned layer once.
  memory     = HBM traffic / HBM bandwidth, with traffic from the compiled memory analysis:
               every argument read once, every output written once, every temporary buffer
               written once and read once. A lower bound: weights and activations re-read
               inside a step (fused or not) are not in it.
  ICI, DCN   = bytes each chip sends in the compiled step's collectives (ring algorithms, see
               `ring_bytes`; ops inside loops counted once per iteration) over the
               generation's ICI bandwidth (one direction of all ports) or its share of the
               host's DCN bandwidth. A collective crosses DCN when its replica group spans
               slices.
Overlap: on TPU, compute, HBM traffic and ICI collectives overlap (XLA runs collectives
asynchronously and fuses elementwise work into matmuls), so the step takes the largest of the
three; DCN collectives (the cross-slice gradient reduction at the end of the backward pass)
are added, not hidden. On a CPU nothing overlaps: the step is the sum.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What the estimate needs of one chip (or one CPU device)."""

    peak_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float  # both directions, all ports
    dcn_bytes_per_s: float
    overlapped: bool  # TPU: compute, HBM and ICI overlap; CPU: they add up


@dataclasses.dataclass(frozen=True)
class Estimate:
    compute_s: float
    memory_s: float
    ici_s: float
    dcn_s: float
    step_s: float
    bound: str  # "compute", "memory", "ici" or "dcn": the largest term
    mfu: float  # model FLOPs (no recompute) / (step time x peak)
    tokens_per_s_per_chip: float


def estimate(
    hw: Hardware,
    *,
    model_flops: float,
    recompute_flops: float,
    traffic_bytes: float,
    ici_bytes: float,
    dcn_bytes: float,
    tokens: float,
) -> Estimate:
    """The step time of one chip from per-chip, per-step quantities (see the module doc)."""
    compute = (model_flops + recompute_flops) / hw.peak_flops
    memory = traffic_bytes / hw.hbm_bytes_per_s
    ici = ici_bytes / (hw.ici_bytes_per_s / 2)
    dcn = dcn_bytes / hw.dcn_bytes_per_s
    if hw.overlapped:
        step = max(compute, memory, ici) + dcn
    else:
        step = compute + memory + ici + dcn
    terms = {"compute": compute, "memory": memory, "ici": ici, "dcn": dcn}
    return Estimate(
        compute,
        memory,
        ici,
        dcn,
        step,
        max(terms, key=lambda k: terms[k]),
        model_flops / (step * hw.peak_flops),
        tokens / step,
    )


def traffic_bytes(argument: int, output: int, temp: int) -> int:
    """HBM bytes moved per step by the stated model: arguments read, outputs written,
    temporaries written and read back."""
    return argument + output + 2 * temp
