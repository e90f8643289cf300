"""Goodput: where a run's wall time goes. A `Clock` charges every second to exactly one
bucket; `summarize` adds the buckets up across the restarts in the run's records.

Buckets: startup (set-up, restore and the first compile), data (waiting for the next
batch), train (steps that advance the run), lost (steps redone after a restart: they had
been reached before the restart, but their update was not in the checkpoint), checkpoint
(training blocked by saves), eval (evaluation and the end-of-run sample), profile (writing
a trace). Time before `train()` is entered (interpreter start, imports) is not counted.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from lmjax.observe import metrics

BUCKETS = ("startup", "data", "train", "lost", "checkpoint", "eval", "profile")
EVENT = "goodput"
PREFIX = "goodput/"


class Clock:
    """Charges elapsed time to the innermost active bucket; outside any `with clock(name)`
    it goes to the base bucket (startup until `set_base`). So the buckets always add up to
    the wall time since the clock was made."""

    def __init__(self, base: str = "startup"):
        self.started_at = time.time()
        self._start = self._since = time.perf_counter()
        self.seconds = dict.fromkeys(BUCKETS, 0.0)
        self._stack = [base]

    def _charge(self) -> None:
        now = time.perf_counter()
        self.seconds[self._stack[-1]] += now - self._since
        self._since = now

    @contextlib.contextmanager
    def __call__(self, bucket: str) -> Iterator[None]:
        self._charge()
        self._stack.append(bucket)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def set_base(self, bucket: str) -> None:
        self._charge()
        self._stack[0] = bucket

    def record(self) -> dict[str, object]:
        """The record of the time so far (cumulative since the clock began)."""
        self._charge()
        wall = self._since - self._start
        out = {
            "event": EVENT,
            "run_start": self.started_at,
            "time": time.time(),
            f"{PREFIX}wall_s": wall,
        }
        out.update({f"{PREFIX}{b}_s": s for b, s in self.seconds.items()})
        out[f"{PREFIX}fraction"] = self.seconds["train"] / wall if wall > 0 else 0.0
        return out


def last_reached_step(workdir: str) -> int:
    """The highest step any earlier start of this run recorded (metrics.read_records; 0: none)."""
    records = metrics.read_records(workdir, missing_ok=True)
    return max((r.get("step", 0) for r in records), default=0)


def summarize(records: list[dict]) -> dict[str, float]:
    """Seconds per bucket summed over every start of the run, plus `between_starts` (from the
    last record of one start to the next start: the tail of a killed process and the time no
    process ran) and `total`, and `goodput` = train / total."""
    starts: dict[float, dict] = {}
    for r in records:
        if r.get("event") == EVENT:
            starts[r["run_start"]] = r  # records are cumulative: the last one holds the totals
    out = dict.fromkeys((*BUCKETS, "between_starts"), 0.0)
    previous_end = None
    for start in sorted(starts):
        r = starts[start]
        for b in BUCKETS:
            out[b] += r.get(f"{PREFIX}{b}_s", 0.0)
        if previous_end is not None:
            out["between_starts"] += max(0.0, start - previous_end)
        previous_end = r["time"]
    out["total"] = sum(out[b] for b in (*BUCKETS, "between_starts"))
    out["goodput"] = out["train"] / out["total"] if out["total"] else 0.0
    out["starts"] = float(len(starts))
    return out
