"""Rehearse a multi-host run on one machine: N processes x M CPU devices, same command.

    python launch/local.py --processes 2 --devices-per-process 4 -- lmjax train ...

Each process gets LMJAX_COORDINATOR (a free localhost port), LMJAX_NUM_PROCESSES,
LMJAX_PROCESS_ID, LMJAX_LOCAL_DEVICES, XLA_FLAGS (M host devices) and JAX_PLATFORMS=cpu;
`lmjax.parallel.distributed.initialize()` picks them up. Output lines are prefixed `[p0]`, `[p1]`, ...
If one process fails, the others are stopped and its exit code is returned.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

TIMEOUT_EXIT = 124  # like coreutils `timeout`
_STOP_GRACE_S = 5.0
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: Mapping[str, str],
    coordinator: str,
    processes: int,
    process_id: int,
    devices_per_process: int,
) -> dict[str, str]:
    """The environment of local process `process_id`: `base` plus the rendezvous variables.

    Any device-count flag already in XLA_FLAGS is replaced; other XLA flags are kept.
    """
    xla_flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    xla_flags.append(f"{_DEVICE_FLAG}={devices_per_process}")
    return {
        **base,
        "LMJAX_COORDINATOR": coordinator,
        "LMJAX_NUM_PROCESSES": str(processes),
        "LMJAX_PROCESS_ID": str(process_id),
        "LMJAX_LOCAL_DEVICES": str(devices_per_process),
        "XLA_FLAGS": " ".join(xla_flags),
        "JAX_PLATFORMS": "cpu",
        "PYTHONUNBUFFERED": "1",
    }


def _resolve(command: Sequence[str]) -> list[str]:
    """Find the program on PATH, else next to this Python (an un-activated venv's `lmjax`)."""
    program = command[0]
    if os.sep not in program and shutil.which(program) is None:
        beside = os.path.join(os.path.dirname(sys.executable), program)
        if os.access(beside, os.X_OK):
            return [beside, *command[1:]]
    return list(command)


def _relay(index: int, stream, out: TextIO, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(f"[p{index}] {line if line.endswith(chr(10)) else line + chr(10)}")
            out.flush()
    stream.close()


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM each live process group, then SIGKILL what is left after a grace period."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in live:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128+N


def launch_local(
    command: list[str],
    processes: int,
    devices_per_process: int,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    out: TextIO | None = None,
) -> int:
    """Run `command` as `processes` local processes with `devices_per_process` CPU devices each.

    env: extra variables on top of os.environ. timeout: seconds before all are stopped
    (returns 124). Returns 0 if all succeed, else the exit code of the first process to fail
    (the others are stopped). Output goes to `out` (default stdout), each line tagged [pI].
    """
    if not command:
        raise ValueError("no command given: launch/local.py ... -- lmjax train ...")
    if processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"need --processes >= 1 and --devices-per-process >= 1, "
            f"got {processes} and {devices_per_process}"
        )
    out = out or sys.stdout
    base = {**os.environ, **(env or {})}
    coordinator = f"127.0.0.1:{free_port()}"
    argv = _resolve(command)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    relays = []
    try:
        for i in range(processes):
            p = subprocess.Popen(
                argv,
                env=process_env(base, coordinator, processes, i, devices_per_process),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            procs.append(p)
            t = threading.Thread(target=_relay, args=(i, p.stdout, out, lock), daemon=True)
            t.start()
            relays.append(t)
        deadline = None if timeout is None else time.monotonic() + timeout
        code = None
        while code is None:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                code = _exit_code(codes[failed[0]])
                message = f"process {failed[0]} exited with code {code}"
            elif all(c == 0 for c in codes):
                code = 0
            elif deadline is not None and time.monotonic() > deadline:
                code, message = TIMEOUT_EXIT, f"timeout after {timeout:g} s"
            else:
                time.sleep(0.05)
        if code:
            running = sum(p.poll() is None for p in procs)
            with lock:
                print(f"[launch] {message}; stopping {running} other process(es)", file=sys.stderr)
    finally:
        _stop(procs)
        for t in relays:
            t.join()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the same command as N local processes x M CPU devices "
        "(a multi-host rehearsal on one machine).",
        usage="%(prog)s --processes N --devices-per-process M [--timeout S] -- COMMAND ...",
    )
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, required=True)
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop everything after this many seconds (exit code 124)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --, e.g. -- lmjax train --experiment smoke")
    return launch_local(command, args.processes, args.devices_per_process, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
