"""The workdir lease with real `lmjax train` processes: a second run beside a live one, and a
holder stopped inside its swap taken over."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from lmjax.checkpoint import lease
from lmjax.observe import metrics
from tests.helpers import REPO, lease_holder, process_stopped

SYNTHETIC = [
    "--experiment",
    "smoke",
    "--set",
    "data.source=synthetic",
    "--set",
    "run.log_every=1",
    "--set",
    "run.eval_batches=1",
]


def _env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env.pop("LMJAX_NUM_PROCESSES", None)
    return env


def _start(workdir, log_path, *sets) -> subprocess.Popen:
    args = [a for s in sets for a in ("--set", s)]
    command = [sys.executable, "-m", "lmjax", "train", "--workdir", str(workdir), *SYNTHETIC, *args]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, env=_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(predicate, proc, what, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _exit_code(proc, timeout: float) -> int | None:
    """The exit code of `proc`, or None when it has not exited within `timeout` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _steps(workdir) -> list[int]:
    return [r["step"] for r in metrics.read_records(workdir, missing_ok=True) if "loss" in r]


def _committed(workdir) -> list[int]:
    root = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def test_a_second_run_on_a_live_workdir_exits_at_once_and_the_first_finishes(tmp_path):
    work = tmp_path / "run"
    first = _start(work, tmp_path / "first.log", "run.steps=100000", "checkpoint.every_steps=5")
    try:
        _wait_for(lambda: 5 in _committed(work), first, "checkpoint 5")
        config_before = (work / "config.json").read_text()
        start = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "lmjax", "train", "--workdir", str(work), *SYNTHETIC],
            env=_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=240,
        )
        took = time.monotonic() - start
        assert first.poll() is None, "the first run died while the second started"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()
    assert second.returncode == 2, second.stderr[-3000:]
    line = [s for s in second.stderr.splitlines() if s.startswith("lmjax:")]
    assert len(line) == 1 and f"pid {first.pid}, started " in line[0], second.stderr[-3000:]
    assert "last renewed" in line[0] and "Traceback" not in second.stderr
    assert "restoring" not in second.stderr and "resumed" not in second.stderr
    print(f"second run refused after {took:.1f} s")
    assert not (work / "checkpoints" / "unreadable").exists()  # nothing set aside
    assert (work / "config.json").read_text() == config_before
    records = metrics.read_records(work)
    assert not [r for r in records if r.get("event") == "start"]  # the second never started
    assert max(_committed(work)) == max(_steps(work)) and lease_holder(work) is None


# The stopping thread signals itself (pthread_kill: a SIGSTOP sent to the process may be taken
# by another thread while this one runs on) and then waits for the file argv[1]/go, which the
# test writes once it has acted on the stop: the code after the stop runs after the test's
# action however late the stop lands.
HOLD = """
import os, signal, sys, threading, time

def stop_until_go():
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    while not os.path.exists(os.path.join(sys.argv[1], "go")):
        time.sleep(0.01)
"""

# `lmjax train` whose lease thread, once the file argv[1]/stop exists, stops the process
# (SIGSTOP) inside its next renewal's swap, right after linking its record.
STOP_IN_SWAP = (
    HOLD
    + """
from lmjax import cli

real = os.link

def link_then_stop(src, dst, *args, **kwargs):
    real(src, dst, *args, **kwargs)
    if threading.current_thread().name == "lmjax-lease" and os.path.exists(
        os.path.join(sys.argv[1], "stop")
    ):
        os.link = real
        stop_until_go()

os.link = link_then_stop
sys.exit(cli.main(sys.argv[2:]))
"""
)


def _start_holder(tmp_path, script: str, sets: list[str]) -> subprocess.Popen:
    """A long `lmjax train` on tmp_path/run through `script` (given tmp_path for its argv[1]),
    with the settings `sets`, logging to tmp_path/hung.log."""
    (tmp_path / "holder.py").write_text(script)
    args = ["train", "--workdir", str(tmp_path / "run"), *SYNTHETIC, "--set", "run.steps=100000"]
    args += [a for s in sets for a in ("--set", s)]
    with open(tmp_path / "hung.log", "w") as out:
        return subprocess.Popen(
            [sys.executable, str(tmp_path / "holder.py"), str(tmp_path), *args],
            env=_env(),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_a_holder_stopped_inside_its_swap_is_taken_over_and_stops_before_its_next_save(
    tmp_path,
):
    """The holder stops (SIGSTOP) in the middle of a renewal's swap; once its lease is past
    the 3 s timeout a new run takes it over with a log line and trains to the end. Continued,
    the old holder stops before its next save (exit 1) and has moved nothing."""
    work, timeout = tmp_path / "run", 3.0
    sets = [f"checkpoint.lease_timeout_s={timeout}", "checkpoint.every_steps=2"]
    hung = _start_holder(tmp_path, STOP_IN_SWAP, sets)
    try:
        _wait_for(lambda: 2 in _committed(work) and len(_steps(work)) >= 3, hung, "step 3")
        (tmp_path / "stop").touch()
        _wait_for(lambda: process_stopped(hung.pid), hung, "the stop inside a renewal", timeout=30)
        renewed = lease_holder(work)["renewed"]
        time.sleep(max(0.0, renewed + timeout - time.time()))
        taker = _start(work, tmp_path / "taker.log", "run.steps=12", *sets)
        assert taker.wait(timeout=240) == 0, (tmp_path / "taker.log").read_text()[-3000:]
        (tmp_path / "go").touch()
        hung.send_signal(signal.SIGCONT)
        assert _exit_code(hung, 120) == 1, (tmp_path / "hung.log").read_text()[-3000:]
    finally:
        hung.send_signal(signal.SIGCONT)
        hung.kill()
    taker_log, hung_log = (tmp_path / "taker.log").read_text(), (tmp_path / "hung.log").read_text()
    assert (
        f"taking over the lease of {work} from host {socket.gethostname()}, pid {hung.pid}"
        in taker_log
    )
    assert "past its 3 s timeout" in taker_log
    # stopped at its next save, or when its save in flight failed (the taker set it aside)
    assert re.search(r"lmjax: .*lease (of .* is|was) lost", hung_log), hung_log[-3000:]
    assert _committed(work)[-1] == 12 and lease_holder(work) is None


# `lmjax train` that stops (SIGSTOP) in its second async save's background thread (the
# save of step 4 with checkpoint.every_steps=2) with every file written, right before the
# lease check that guards the commit: where a holder frozen anywhere during the write resumes.
STOP_BEFORE_COMMIT = (
    HOLD
    + """
from lmjax import cli
from lmjax.checkpoint import lease

real = lease.Guard.confirm_commit
calls = []

def stop_then_confirm(self):
    calls.append(None)
    if len(calls) == 2:
        stop_until_go()
    real(self)

lease.Guard.confirm_commit = stop_then_confirm
sys.exit(cli.main(sys.argv[2:]))
"""
)


def test_a_holder_stopped_in_its_async_save_does_not_commit_it_after_a_takeover(tmp_path):
    """The holder stops (SIGSTOP) while its save of step 4 is in flight, its files written;
    once its lease is past the 3 s timeout another run takes it over. Continued, the old
    holder does not commit step 4 (orbax's commit waits on the lease check) and exits 1
    naming the lost lease; its temporary directory stays for the new run to set aside."""
    work, timeout = tmp_path / "run", 3.0
    sets = [f"checkpoint.lease_timeout_s={timeout}", "checkpoint.every_steps=2"]
    hung = _start_holder(tmp_path, STOP_BEFORE_COMMIT, sets)
    taker = lease.Lease(lease.record_for(str(work)), 60.0, str(work))
    try:
        _wait_for(lambda: process_stopped(hung.pid), hung, "the stop before a commit")
        renewed = lease_holder(work)["renewed"]
        time.sleep(max(0.0, renewed + timeout - time.time()) + 0.1)
        taker.acquire()  # past its timeout: taken over
        (tmp_path / "go").touch()
        hung.send_signal(signal.SIGCONT)
        assert _exit_code(hung, 120) == 1, (tmp_path / "hung.log").read_text()[-3000:]
    finally:
        hung.send_signal(signal.SIGCONT)
        hung.kill()
    hung_log = (tmp_path / "hung.log").read_text()
    assert "CHECKPOINT 4 FAILED: not committed: the lease of" in hung_log, hung_log[-3000:]
    assert re.search(r"lmjax: .*lease (of .* is|was) lost", hung_log), hung_log[-3000:]
    assert _committed(work) == [2]
    assert [p.name for p in (work / "checkpoints").iterdir() if p.name.startswith("4.")]
    assert lease_holder(work)["token"] == taker._token
    taker.release()
