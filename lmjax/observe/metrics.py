"""A run's records: the writers (JSONL objects in WORKDIR/metrics/, TensorBoard, terminal
progress, extra outputs such as W&B) and the one reader of the records (`read_records`)."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

from lmjax import storage
from lmjax.workdir_names import LEGACY_METRICS, METRICS, TENSORBOARD

CHUNK_RECORDS = 1000
REMOTE_FLUSH_S = 10.0


class RecordLog:
    """One start's records as JSONL objects `WORKDIR/metrics/SSSSSS-CCCCCC.jsonl` (start,
    chunk), for local and gs:// workdirs alike: Cloud Storage cannot append, so each object is
    rewritten whole, at most every `flush_s` seconds, and holds at most `CHUNK_RECORDS` records
    (then the next chunk begins): a flush costs one write of at most one chunk."""

    def __init__(self, workdir: str, flush_s: float):
        self.dir = storage.join(workdir, METRICS)
        storage.path(self.dir).mkdir(parents=True, exist_ok=True)
        starts = [int(os.path.basename(p)[:6]) for p in _record_objects(workdir)]
        self.start = max(starts, default=-1) + 1  # one listing per start
        self.flush_s = flush_s
        self.chunk, self.flushed = 0, -math.inf
        self.lines: list[str] = []

    def append(self, record: dict) -> None:
        self.lines.append(json.dumps(record) + "\n")
        if len(self.lines) == CHUNK_RECORDS:
            self.flush()
            self.chunk, self.lines = self.chunk + 1, []
        elif time.monotonic() - self.flushed >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            name = f"{self.start:06d}-{self.chunk:06d}.jsonl"
            storage.write_atomic(storage.join(self.dir, name), "".join(self.lines).encode())
        self.flushed = time.monotonic()


class EventFiles:
    """TensorBoard scalars in WORKDIR/tensorboard. A local workdir gets one growing event file;
    for gs://, whose objects cannot grow, events are written to a local folder and every
    `flush_s` seconds its event file is closed, uploaded once and replaced by a new one
    (TensorBoard reads every event file of a folder in order)."""

    def __init__(self, workdir: str, flush_s: float):
        from tensorboardX import SummaryWriter

        self._writer_class = SummaryWriter
        self.remote = storage.join(workdir, TENSORBOARD)
        self.local = tempfile.mkdtemp(prefix="lmjax-tb-") if storage.is_url(workdir) else None
        self.flush_s = flush_s
        self.files = 0
        self.writer = self._new_writer()

    def _new_writer(self) -> Any:
        # Event file names hold the time in whole seconds: the counter keeps two files of
        # one second (and their order) apart.
        self.files += 1
        self.rotated = time.monotonic()
        return self._writer_class(self.local or self.remote, filename_suffix=f".{self.files:06d}")

    def add_scalars(self, step: int, record: dict) -> None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()
        if self.local is not None and time.monotonic() - self.rotated >= self.flush_s:
            self._upload()
            self.writer = self._new_writer()

    def _upload(self) -> None:
        self.writer.close()
        assert self.local is not None
        for name in os.listdir(self.local):  # a local temporary folder
            storage.upload(os.path.join(self.local, name), storage.join(self.remote, name))
            os.remove(os.path.join(self.local, name))

    def close(self) -> None:
        if self.local is None:
            self.writer.close()
        else:
            self._upload()
            os.rmdir(self.local)


class MetricsWriter:
    """Writes each record to the run's metrics objects (`RecordLog`), scalars to TensorBoard
    (`EventFiles`), each record to the `outputs` (objects with write(step, record) and
    close(), e.g. W&B), and a progress line to stdout. Only process 0 writes; the others are
    silent no-ops."""

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        *,
        enabled: bool = True,
        start_step: int = 0,
        outputs: tuple = (),
        flush_s: float | None = None,
    ):
        """start_step: the step this process starts at (a resumed run's restored step); the
        ETA divides this process's time by the steps it has done since. flush_s: the most
        seconds records wait before they are written (default: none locally, REMOTE_FLUSH_S
        on gs://, where an object may change about once a second)."""
        self.enabled = enabled
        self.outputs = outputs
        self.total_steps = total_steps
        self.start_step = start_step
        self.tty = sys.stdout.isatty()
        if flush_s is None:
            flush_s = REMOTE_FLUSH_S if storage.is_url(workdir) else 0.0
        if enabled:
            self._log = RecordLog(workdir, flush_s)
            self._tb = EventFiles(workdir, flush_s)
        self.start = time.time()  # once the sinks are open: the ETA counts steps only

    def write(self, step: int, values: dict[str, Any], *, progress: bool = True) -> None:
        """Records `{"step": step, **values}`; `progress=False` keeps it off the terminal."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._log.append(record)
        self._tb.add_scalars(step, record)
        for out in self.outputs:
            out.write(step, record)
        if progress:
            self._progress(step, record)

    def _progress(self, step: int, record: dict) -> None:
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "step")
        done = max(step - self.start_step, 1)
        eta = (time.time() - self.start) / done * (self.total_steps - step)
        line = f"step {step}/{self.total_steps} {shown} eta={eta:.0f}s"
        if self.tty:
            print("\r" + line[: os.get_terminal_size().columns - 1], end="", flush=True)
            if "eval_loss" in record or step >= self.total_steps:
                print()
        else:
            print(line, flush=True)

    def close(self, final: Callable[[], tuple[int, dict[str, Any]]] | None = None) -> None:
        """Closes TensorBoard and the outputs, then records `final()` -> (step, values) alone
        and flushes: computed last, a record can account for the closing itself."""
        if not self.enabled:
            return
        self._tb.close()
        for out in self.outputs:
            out.close()
        if final is not None:
            step, values = final()
            self._log.append({"step": int(step), **values})
        self._log.flush()


def _record_objects(workdir: str | os.PathLike) -> list[str]:
    """The run's metrics objects in the order they were written (start, then chunk)."""
    return storage.glob(storage.join(workdir, METRICS, "[0-9]*-[0-9]*.jsonl"))


def read_records(workdir: str | os.PathLike, *, missing_ok: bool = False) -> list[dict]:
    """The run's records in the order they were written, every start included: those of
    WORKDIR/metrics.jsonl (written by lmjax before the metrics objects), then of each object
    of WORKDIR/metrics/.

    A last line without its newline is left out: a process killed while writing it leaves it
    torn, and every complete record ends with a newline. No records at all raise
    FileNotFoundError, or with `missing_ok` read as none (a run that has not logged yet).
    """
    texts = [storage.read_text_or_none(storage.join(workdir, LEGACY_METRICS))]
    texts += [storage.path(p).read_text() for p in _record_objects(workdir)]
    if texts == [None] and not missing_ok:
        raise FileNotFoundError(f"{storage.join(workdir, METRICS)} does not exist")
    return [
        json.loads(line)
        for text in texts
        if text
        for line in text.splitlines(keepends=True)
        if line.endswith("\n")
    ]


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
