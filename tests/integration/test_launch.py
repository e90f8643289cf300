"""Launchers: local processes for real; TPU/GKE/SLURM through their dry-run commands, with the
remote and container scripts executed by a real bash against fake gcloud-side tools."""

import io
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from launch.local import TIMEOUT_EXIT, launch_local, process_env
from tests.helpers import WORKER_SCRIPT
from tests.unit.test_launch import REPO, _executable

PY = sys.executable


def _clean_env(**extra):
    drop = (
        "XLA_FLAGS",
        "LMJAX_COORDINATOR",
        "LMJAX_NUM_PROCESSES",
        "LMJAX_PROCESS_ID",
        "LMJAX_LOCAL_DEVICES",
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def test_local_two_processes_run_a_global_sum(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    out = io.StringIO()
    code = launch_local(
        [PY, str(script)],
        processes=2,
        devices_per_process=2,
        env=_clean_env(),
        timeout=240,
        out=out,
    )
    lines = out.getvalue().splitlines()
    assert code == 0, "\n".join(lines[-40:])
    for i in range(2):
        result = [l.split() for l in lines if l.startswith(f"[p{i}] RESULT")]
        assert result, "\n".join(lines[-40:])
        # process, count, local devices, global devices, sum and psum of 1..4
        assert result[0][2:8] == [str(i), "2", "2", "4", "10.0", "10.0"]
    assert all(l.startswith(("[p0] ", "[p1] ")) for l in lines)


def test_local_failure_stops_the_others_and_returns_its_code(tmp_path):
    pid_file = tmp_path / "sleeper.pid"
    code = textwrap.dedent(f"""
        import os, sys, time
        if os.environ["LMJAX_PROCESS_ID"] == "1":
            print("failing now"); sys.exit(3)
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        print("sleeping", flush=True); time.sleep(120); print("woke up")
    """)
    p = subprocess.run(
        [
            PY,
            str(REPO / "launch" / "local.py"),
            "--processes",
            "2",
            "--devices-per-process",
            "1",
            "--",
            PY,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=100,
    )
    assert p.returncode == 3, p.stderr
    assert "[p1] failing now" in p.stdout and "woke up" not in p.stdout
    assert "process 1 exited with code 3" in p.stderr
    if pid_file.exists():  # process 0 got as far as sleeping: it must be gone now
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


def test_local_environment_and_timeout(tmp_path):
    env = process_env(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/d"},
        "127.0.0.1:5",
        4,
        2,
        3,
    )
    assert env["XLA_FLAGS"] == "--xla_dump_to=/d --xla_force_host_platform_device_count=3"
    assert (
        env["LMJAX_COORDINATOR"],
        env["LMJAX_NUM_PROCESSES"],
        env["LMJAX_PROCESS_ID"],
        env["LMJAX_LOCAL_DEVICES"],
        env["JAX_PLATFORMS"],
    ) == ("127.0.0.1:5", "4", "2", "3", "cpu")
    out = io.StringIO()
    assert (
        launch_local(
            [PY, "-c", "import time; print('up', flush=True); time.sleep(60)"],
            2,
            1,
            timeout=3,
            out=out,
        )
        == TIMEOUT_EXIT
    )
    with pytest.raises(ValueError, match="no command"):
        launch_local([], 2, 1)


_FAKE_SRUN = """#!{python}
# Stand-in for srun on one machine: start SLURM_NTASKS local tasks with the step variables.
import os, subprocess, sys
argv = sys.argv[1:]
while argv and argv[0].startswith("--"):
    argv.pop(0)
# Each task's stdout goes to its own file: two tasks sharing one pipe interleave mid-line.
n = int(os.environ["SLURM_NTASKS"])
outs = [open(os.path.join(os.environ["FAKE_SRUN_OUT"], f"task{{i}}.out"), "w") for i in range(n)]
procs = [subprocess.Popen(argv, stdout=outs[i],
                          env=dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                                   SLURM_STEP_NODELIST="localhost"))
         for i in range(n)]
sys.exit(max(p.wait() for p in procs))
"""


def test_sbatch_script_runs_jax_slurm_detection_end_to_end(tmp_path):
    """The checked-in script under a fake srun: 2 tasks find each other via SLURM_* alone."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", _FAKE_SRUN.format(python=PY))
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clean_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_NTASKS="2",
        JAX_COORDINATOR_PORT=str(port),
        LMJAX_LOCAL_DEVICES="2",
        FAKE_SRUN_OUT=str(tmp_path),
    )
    p = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), PY, str(worker)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    stdout = "".join((tmp_path / f"task{i}.out").read_text() for i in range(2))
    results = sorted(m.split() for m in re.findall(r"RESULT ((?:\S+ ){5}\S+)", stdout))
    assert results == [["0", "2", "2", "4", "10.0", "10.0"], ["1", "2", "2", "4", "10.0", "10.0"]]
    assert p.stderr.count("(slurm start): 2 local cpu devices, 4 global") == 2
    no_command = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch")], capture_output=True, text=True, env=env
    )
    assert no_command.returncode == 2 and "usage: sbatch" in no_command.stderr
