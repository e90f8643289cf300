"""A run's records: the writers (metrics.jsonl, TensorBoard, terminal progress, extra outputs
such as W&B) and the one reader of metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from lmjax.workdir_names import METRICS, TENSORBOARD


class MetricsWriter:
    """Writes one JSON object per line to `metrics.jsonl`, scalars to TensorBoard, each record
    to the `outputs` (objects with write(step, record) and close(), e.g. W&B), and a progress
    line to stdout. Only process 0 writes; the others are silent no-ops."""

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        *,
        enabled: bool = True,
        start_step: int = 0,
        outputs: tuple = (),
    ):
        """start_step: the step this process starts at (a resumed run's restored step); the
        ETA divides this process's time by the steps it has done since."""
        self.enabled = enabled
        self.outputs = outputs
        self.total_steps = total_steps
        self.start_step = start_step
        self.start = time.time()
        self.tty = sys.stdout.isatty()
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, METRICS)
            drop_torn_tail(path)
            self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD))

    def write(self, step: int, values: dict[str, Any], *, progress: bool = True) -> None:
        """Appends `{"step": step, **values}`; `progress=False` keeps it off the terminal."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
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
        """Closes TensorBoard and the outputs, then appends `final()` -> (step, values) to
        metrics.jsonl alone: computed last, a record can account for the closing itself."""
        if not self.enabled:
            return
        self._tb.close()
        for out in self.outputs:
            out.close()
        if final is not None:
            step, values = final()
            self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.close()


def drop_torn_tail(path: str) -> None:
    """Cuts a last line without its newline from the file at `path`, if any: the record a
    killed process was writing, never readable. Appending after it would glue the next record
    onto it and leave an unreadable line in the middle of the file."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        end = pos = f.seek(0, os.SEEK_END)
        while pos > 0:  # back from the end, a block at a time, to the last newline
            start = max(pos - 4096, 0)
            f.seek(start)
            block = f.read(pos - start)
            if pos == end and block.endswith(b"\n"):
                return
            newline = block.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            pos = start
        f.truncate(0)


def read_records(workdir: str | os.PathLike, *, missing_ok: bool = False) -> list[dict]:
    """The records of `workdir`/metrics.jsonl in file order, every start of the run included.

    A last line without its newline is left out: a process killed while writing it (or one
    still writing) leaves it torn, and every complete record ends with a newline. A missing
    file raises FileNotFoundError, or with `missing_ok` reads as no records (a run that has
    not logged yet).
    """
    try:
        with open(os.path.join(workdir, METRICS)) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        if missing_ok:
            return []
        raise


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
