"""`lmjax doctor` and the preflight of `lmjax train`: the checks on this machine, the verdict of
a job's processes on their reports, and real 2-process jobs started inconsistently (gloo),
each of which ends every process in bounded time with a message naming the cause."""

import subprocess
import sys
import time

from lmjax.parallel import distributed
from tests.helpers import clean_env, free_port


def _start(argv, coordinator, count, index):
    env = clean_env(
        LMJAX_COORDINATOR=coordinator,
        LMJAX_NUM_PROCESSES=str(count),
        LMJAX_PROCESS_ID=str(index),
        LMJAX_INIT_TIMEOUT="4",
    )
    cmd = [sys.executable, "-m", "lmjax", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(procs, limit_s=60):
    """(exit code, stdout + stderr) of each process; fails past `limit_s` seconds."""
    start = time.monotonic()
    done = [(p.wait(timeout=limit_s), p.stdout.read() + p.stderr.read()) for p in procs]
    assert time.monotonic() - start < limit_s
    return done


def test_a_process_started_for_another_process_count_ends_both_processes():
    """jax admits process 1 of "3" into a job of 2; the preflight's reports catch it."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [_start(["doctor"], coordinator, n, i) for i, n in enumerate((2, 3))]
    for code, out in _finish(procs):
        assert code == 1, out
        assert "[FAIL] processes: process 1 (" in out, out
        assert "was started for 3 processes but 2 joined" in out


def test_two_processes_claiming_index_0_both_end_with_their_message():
    port = free_port()
    first = _start(["doctor"], f"127.0.0.1:{port}", 2, 0)
    deadline = time.monotonic() + 60
    while not distributed._port_open(f"127.0.0.1:{port}", 0.2):  # its coordinator is up
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.1)
    second = _start(["doctor"], f"127.0.0.1:{port}", 2, 0)
    (code0, out0), (code1, out1) = _finish([first, second])
    assert code1 == 2 and "another process claims index 0" in out1, out1
    assert code0 == distributed.RENDEZVOUS_TIMEOUT_EXIT, out0
    assert "distinct LMJAX_PROCESS_ID 0..1" in out0


def test_train_with_mismatched_configs_ends_both_processes_before_compiling(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    train = ["train", "--experiment", "smoke", "--workdir", str(tmp_path)]
    lrs = (["--set", "optim.lr=0.003"], ["--set", "optim.lr=0.01"])
    procs = [_start(train + lr, coordinator, 2, i) for i, lr in enumerate(lrs)]
    for code, out in _finish(procs):
        assert code == 2, out
        assert "lmjax: preflight failed" in out
        assert "config differs between process 0 (" in out and "optim.lr: 0.003 vs 0.01" in out
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "tokenizer.model").exists()
