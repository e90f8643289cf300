"""Do the processes of a job agree? Checked once they have joined, before anything compiles.

Each process publishes a `Report` (what it was started for, its facts and its own failed
checks) under its index in the key-value service of jax's coordination service, then reads every
other process's within a timeout. Every process then holds the same reports and so reaches the
same verdict (`disagreements`): on a mismatch each one ends with the same message, instead of
one process running alone or all of them hanging in their first collective.

Two processes started with the same index never get this far: jax admits one task per index,
so they wait in `distributed.initialize`, which refuses a second process 0 up front and times
out otherwise.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from typing import Any

import jax

from lmjax.config import ConfigError

# One exchange per call: every process makes the same calls in the same order, so the n-th
# exchange of each process uses the same keys.
_ROUNDS = itertools.count()


@dataclasses.dataclass(frozen=True)
class Report:
    """What one process says about itself.

    index: its jax process index. started_for: the process count it was started with
    (LMJAX_NUM_PROCESSES or SLURM_NTASKS; None when jax found the count itself). facts: name ->
    value, each of which every process must share (device kind, versions, the config as JSON,
    ...); a value that is a JSON object is compared field by field. failures: its own failed
    checks, one sentence each.
    """

    index: int
    host: str
    started_for: int | None
    facts: dict[str, str]
    failures: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Report:
        d = json.loads(text)
        return cls(d["index"], d["host"], d["started_for"], d["facts"], tuple(d["failures"]))


def _client() -> Any:
    """jax's coordination-service client (jax has no public accessor); None when alone."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def exchange(report: Report, timeout_s: float) -> list[Report]:
    """Every process's report, by index, this one's included. Raises ConfigError naming the
    processes whose reports did not arrive within `timeout_s`."""
    client = _client()
    if client is None:
        return [report]
    prefix = f"lmjax/agreement/{next(_ROUNDS)}/"
    try:
        client.key_value_set(prefix + str(report.index), report.to_json())
    except jax.errors.JaxRuntimeError as e:
        raise ConfigError(
            f"process index {report.index} is already taken ({e}): give every process a "
            f"distinct process id"
        ) from None
    deadline = time.monotonic() + timeout_s
    texts = {}
    for i in range(jax.process_count()):
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            texts[i] = client.blocking_key_value_get(prefix + str(i), left_ms)
        except jax.errors.JaxRuntimeError:
            pass  # missing: named below, once every index had its chance
    missing = [i for i in range(jax.process_count()) if i not in texts]
    if missing:
        raise ConfigError(
            f"process(es) {missing} of {jax.process_count()} did not report within "
            f"{timeout_s:g} s after joining: start the same lmjax command on every process "
            f"(and read the logs of those processes)"
        )
    return [Report.from_json(texts[i]) for i in range(jax.process_count())]


def _field_diff(a: str, b: str) -> str:
    """The fields in which JSON objects `a` and `b` differ ("x.y: 1 vs 2"), or '' when either
    is not a JSON object."""
    try:
        left, right = json.loads(a), json.loads(b)
    except ValueError:
        return ""
    if not isinstance(left, dict) or not isinstance(right, dict):
        return ""

    def flat(d: dict, at: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{at}{k}.") if isinstance(v, dict) else {f"{at}{k}": v})
        return out

    fa, fb = flat(left), flat(right)
    keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    return "; ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in keys)


def disagreements(reports: list[Report], joined: int) -> list[str]:
    """One sentence per way the `reports` of a job of `joined` processes disagree, each naming
    the processes and the fix; [] when they agree."""
    out = [
        f"process {r.index} ({r.host}) was started for {r.started_for} processes but "
        f"{joined} joined: start every process with the same process count "
        f"(LMJAX_NUM_PROCESSES, srun --ntasks)"
        for r in reports
        if r.started_for is not None and r.started_for != joined
    ]
    first = reports[0]
    for name, value in first.facts.items():
        differ = [r for r in reports[1:] if r.facts.get(name) != value]
        for r in differ:
            other = r.facts.get(name, "")
            out.append(
                f"{name} differs between process {first.index} ({first.host}) and process "
                f"{r.index} ({r.host}): {_field_diff(value, other) or f'{value!r} vs {other!r}'}"
                f"; start every process the same way"
            )
    return out


def peer_failures(reports: list[Report], index: int) -> list[str]:
    """The failed checks of every process but `index`, one sentence each, naming the process."""
    return [
        f"process {r.index} ({r.host}): {f}"
        for r in reports
        if r.index != index
        for f in r.failures
    ]
