"""Collectives of a compiled step, read from its HLO text: kind, bytes per chip, replica-group
size, whether the group spans slices, and how often each runs per step (loop trip counts)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
}
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(_COLLECTIVES) + r")(-start)?\("
)
_ARRAY = re.compile(r"\b([a-z0-9]+)\[([\d,]*)\]")
_CALLEE = re.compile(
    r"(?:calls|to_apply|body|condition|true_computation|false_computation)="
    r"(%[\w.\-]+)|branch_computations=\{([^}]*)\}"
)


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # "all-gather", ...
    result_bytes: int  # per chip, of one execution
    group_size: int
    crosses_slices: bool
    executions: int  # per step: product of the trip counts of the loops around it

    @property
    def bytes_sent(self) -> float:
        """Bytes one chip sends per step: `ring_bytes` x executions."""
        return ring_bytes(self.kind, self.result_bytes, self.group_size) * self.executions


def ring_bytes(kind: str, result_bytes: float, n: int) -> float:
    """Bytes each of `n` chips sends in one ring collective whose per-chip result has
    `result_bytes`: all-gather and all-to-all (n-1)/n of the result, reduce-scatter n-1 times
    the (scattered) result, all-reduce twice (n-1)/n (a reduce-scatter then an all-gather),
    collective-permute the whole result."""
    if n <= 1:
        return 0.0
    return {
        "all-gather": result_bytes * (n - 1) / n,
        "all-to-all": result_bytes * (n - 1) / n,
        "reduce-scatter": result_bytes * (n - 1),
        "all-reduce": 2 * result_bytes * (n - 1) / n,
        "collective-permute": float(result_bytes),
    }[kind]


def _array_bytes(text: str) -> list[int]:
    return [
        math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[t]
        for t, dims in _ARRAY.findall(text)
        if t in _DTYPE_BYTES
    ]


def replica_groups(line: str, n_devices: int) -> list[list[int]]:
    """The device groups of one collective instruction, from any of XLA's spellings:
    {{0,1},{2,3}}; [2,2]<=[4] or [2,2]<=[2,2]T(1,0) (iota); mesh['a'=2,'b'=2] {'b'}
    (groups along the named axes of the row-major device mesh); source_target_pairs for
    collective-permute; absent or {} (all devices, one group)."""
    if m := re.search(r"source_target_pairs=\{([^}]*(?:\}[^}]*)*?)\}(?:,|$)", line):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2))]
        rest = [i for i in range(len(names)) if i not in grouped]
        ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + grouped)
        return ids.reshape(-1, math.prod(sizes[i] for i in grouped)).tolist()
    if m := re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        shape = [int(x) for x in m.group(1).split(",")]
        ids = np.arange(math.prod(shape)).reshape([int(x) for x in m.group(2).split(",")])
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(shape[0], -1).tolist()
    if m := re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line):
        return [
            [int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))
        ]
    return [list(range(n_devices))]


def _computations(hlo: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: its instruction lines}, and the entry computation's name (None
    when the text has no ENTRY)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?(%[\w.\-]+) .*\{$", line)
        if header:
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
        elif current is not None and line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _trip_count(condition: list[str]) -> int:
    """A jax loop's condition compares its counter with an s32 constant: that constant
    (1 when the condition has another form)."""
    constants = dict(
        re.findall(r"(%[\w.\-]+) = s32\[\][^=]*? constant\((\d+)\)", "\n".join(condition))
    )
    for line in condition:
        if compare := re.search(r"compare\(([^)]*)\)", line):
            for operand in re.findall(r"%[\w.\-]+", compare.group(1)):
                if operand in constants:
                    return int(constants[operand])
    return 1


def _executions(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry (loop bodies times their
    trip counts, nested loops multiplied)."""
    runs: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        runs[name] = runs.get(name, 0) + times
        for line in comps.get(name, ()):
            body = re.search(r"condition=(%[\w.\-]+), body=(%[\w.\-]+)", line)
            trips = _trip_count(comps.get(body.group(1), [])) if body else 1
            for single, branches in _CALLEE.findall(line):
                for callee in [single] if single else re.findall(r"%[\w.\-]+", branches):
                    is_body = body is not None and callee == body.group(2)
                    visit(callee, times * (trips if is_body else 1))

    visit(entry, 1)
    return runs


def collectives(hlo: str, slice_of: Sequence[int]) -> list[Collective]:
    """Every collective of a compiled SPMD module's text (`compiled.as_text()`).

    slice_of[i]: the slice of the i-th device of the executable's device assignment (the
    mesh's devices in row-major order), which the replica groups number.
    """
    comps, entry = _computations(hlo)
    if entry is None:  # no ENTRY computation: nothing runs
        return []
    found = []
    for name, times in _executions(comps, entry).items():
        for line in comps.get(name, ()):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            kind, arrays = m.group(2), _array_bytes(m.group(1))
            if m.group(3) and kind == "all-gather":  # (operands, outputs): the gathered output
                result = arrays[-1]
            elif m.group(3) and kind == "collective-permute":  # (operand, output, contexts)
                result = arrays[0]
            else:
                result = sum(arrays)
            groups = replica_groups(line, len(slice_of))
            size = 2 if kind == "collective-permute" else max(len(g) for g in groups)
            crosses = any(len({slice_of[i] for i in g}) > 1 for g in groups)
            found.append(Collective(kind, result, size, crosses, times))
    return found
