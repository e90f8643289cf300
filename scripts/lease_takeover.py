"""Measures how long a new `lmjax train` takes to hold a workdir whose lease holder is gone
(the README's Reliability figures):

- elsewhere: a holder on another host stops renewing (its record, with --timeout, is written
  as that host would, then left alone): seconds from its last renewal until the new run
  holds the lease (the new run is started at once, so it watches the lease expire);
- here: a run on this host is SIGKILLed once it holds the lease: seconds from the kill until
  the next run holds it.

    python scripts/lease_takeover.py --timeout 60
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmjax.checkpoint import lease

COMMAND = [sys.executable, "-m", "lmjax", "train", "--experiment", "smoke"]
SETS = ["data.source=synthetic", "run.steps=100000", "run.eval_batches=1"]


def _start(workdir: Path, timeout: float) -> subprocess.Popen:
    sets = [a for s in [*SETS, f"checkpoint.lease_timeout_s={timeout}"] for a in ("--set", s)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [*COMMAND, "--workdir", str(workdir), *sets],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _holder_pid(workdir: Path) -> int | None:
    text = lease.record_for(str(workdir)).read()[0]
    try:
        return json.loads(text)["pid"] if text else None
    except (ValueError, KeyError):
        return None


def _held_by(workdir: Path, proc: subprocess.Popen) -> float:
    """time.time() once `proc` holds the lease of `workdir`."""
    while _holder_pid(workdir) != proc.pid:
        if proc.poll() is not None:
            raise SystemExit(f"the run exited with {proc.returncode} before holding the lease")
        time.sleep(0.01)
    return time.time()


def elsewhere(workdir: Path, timeout: float) -> float:
    renewed = time.time()
    record = {"host": "another-host", "pidns": "", "pid": 1, "proc_start": "0", "token": "x"}
    record.update(started=renewed, renewed=renewed, timeout_s=timeout)
    assert lease.record_for(str(workdir)).swap((0, None), json.dumps(record))
    proc = _start(workdir, timeout)
    try:
        return _held_by(workdir, proc) - renewed
    finally:
        proc.kill()


def here(workdir: Path, timeout: float) -> float:
    first = _start(workdir, timeout)
    _held_by(workdir, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = time.time()
    second = _start(workdir, timeout)
    try:
        return _held_by(workdir, second) - killed
    finally:
        second.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="checkpoint.lease_timeout_s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        remote = elsewhere(Path(tmp) / "elsewhere", args.timeout)
        print(f"holder elsewhere stopped renewing: held {remote:.1f} s after its last renewal")
        local = here(Path(tmp) / "here", args.timeout)
        print(f"holder on this host SIGKILLed: held {local:.1f} s after the kill (a process start)")


if __name__ == "__main__":
    main()
