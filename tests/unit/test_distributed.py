"""lmjax.parallel.distributed: rendezvous choice, hints, and real 2-process runs over gloo."""

import subprocess
import sys

import jax
import pytest

from lmjax.parallel import distributed
from lmjax.parallel.distributed import Rendezvous, plan_rendezvous, rendezvous_hint
from tests.helpers import RENDEZVOUS_VARS, WORKER_SCRIPT, clean_env, free_port

PY = sys.executable
# --- choosing how to start ------------------------------------------------------------------


def test_nothing_set_is_single_process():
    assert plan_rendezvous({}).kind == "single"
    assert plan_rendezvous({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).kind == "single"


def test_explicit_from_environment_and_arguments_win():
    env = {
        "LMJAX_COORDINATOR": "10.0.0.2:8476",
        "LMJAX_NUM_PROCESSES": "4",
        "LMJAX_PROCESS_ID": "3",
    }
    assert plan_rendezvous(env) == Rendezvous("explicit", "10.0.0.2:8476", 4, 3)
    assert plan_rendezvous(env, process_id=1) == Rendezvous("explicit", "10.0.0.2:8476", 4, 1)
    assert plan_rendezvous({}, "h:1", 2, 0) == Rendezvous("explicit", "h:1", 2, 0)
    assert plan_rendezvous({"LMJAX_NUM_PROCESSES": "1"}).kind == "single"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"LMJAX_COORDINATOR": "h:1", "LMJAX_NUM_PROCESSES": "2"}, "LMJAX_PROCESS_ID"),
        ({"LMJAX_NUM_PROCESSES": "2", "LMJAX_PROCESS_ID": "0"}, "LMJAX_COORDINATOR"),
        (
            {"LMJAX_COORDINATOR": "hostonly", "LMJAX_NUM_PROCESSES": "2", "LMJAX_PROCESS_ID": "0"},
            "host:port",
        ),
        (
            {"LMJAX_COORDINATOR": "h:1", "LMJAX_NUM_PROCESSES": "2", "LMJAX_PROCESS_ID": "2"},
            "0 <= process_id < num_processes",
        ),
        (
            {"LMJAX_COORDINATOR": "h:1", "LMJAX_NUM_PROCESSES": "two", "LMJAX_PROCESS_ID": "0"},
            "LMJAX_NUM_PROCESSES='two' is not an integer",
        ),
    ],
)
def test_explicit_errors_name_the_fix(env, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_rendezvous(env)


def test_slurm_detected_under_srun_and_refused_outside_it():
    step = {
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "node[001-004]",
    }
    assert plan_rendezvous(step) == Rendezvous("slurm", None, 16, 5)
    batch_only = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "16"}
    with pytest.raises(ValueError, match="srun"):
        plan_rendezvous(batch_only)
    # Explicit settings beat SLURM's.
    explicit = dict(step, LMJAX_COORDINATOR="h:1", LMJAX_NUM_PROCESSES="2", LMJAX_PROCESS_ID="1")
    assert plan_rendezvous(explicit).kind == "explicit"


def test_cloud_tpu_uses_jax_auto_detection():
    assert plan_rendezvous({}, on_cloud_tpu=True) == Rendezvous("tpu")
    # The flag read from jax exists (a jax upgrade moving it must fail here, not silently
    # turn a TPU pod into N single-process runs); this machine has no TPU chips.
    assert distributed._on_cloud_tpu() is False


def test_hints_say_where_and_what_to_check():
    r0 = Rendezvous("explicit", "10.1.2.3:9000", 3, 0)
    h = rendezvous_hint(r0, 20, port_open=lambda a: pytest.fail("process 0 must not probe"))
    assert "process 0 of 3" in h and "10.1.2.3:9000" in h and "other 2 process(es)" in h
    assert "LMJAX_NUM_PROCESSES=3" in h and "LMJAX_PROCESS_ID 0..2" in h and "20 s" in h
    r2 = Rendezvous("explicit", "10.1.2.3:9000", 3, 2)
    assert "nothing answers at 10.1.2.3:9000" in rendezvous_hint(r2, 20, lambda a: False)
    assert "accepts connections" in rendezvous_hint(r2, 20, lambda a: True)
    assert "SLURM_STEP_NODELIST" in rendezvous_hint(Rendezvous("slurm", None, 8, 3), 5)
    assert "--worker=all" in rendezvous_hint(Rendezvous("tpu"), 5)


def test_single_process_initialize_is_a_no_op(monkeypatch):
    for k in RENDEZVOUS_VARS[:-1]:
        monkeypatch.delenv(k, raising=False)
    distributed.initialize()
    assert not jax.distributed.is_initialized()
    assert jax.process_count() == 1 and distributed.is_primary()


# --- real processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_agree_on_a_global_sum(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [PY, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(
                LMJAX_COORDINATOR=coordinator,
                LMJAX_NUM_PROCESSES="2",
                LMJAX_PROCESS_ID=str(i),
                LMJAX_LOCAL_DEVICES="3",
            ),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    expected = float(sum(range(1, 7)))  # 2 processes x 3 devices hold 1..6
    for i, (out, err) in enumerate(outputs):
        result = next(line.split() for line in out.splitlines() if line.startswith("RESULT"))
        assert result[1:5] == [str(i), "2", "3", "6"]
        assert float(result[5]) == expected and float(result[6]) == expected
        assert result[7] == str(i == 0)
        assert (
            f"lmjax.parallel.distributed: process {i}/2 (explicit start, coordinator {coordinator}): "
            f"3 local cpu devices, 6 global"
        ) in err


@pytest.mark.slow
def test_missing_peer_fails_with_a_hint_within_the_timeout():
    """Process 0 alone and process 1 alone (different ports) both give up after 6 s."""
    ports = [free_port(), free_port()]
    code = "from lmjax.parallel import distributed; distributed.initialize(); print('JOINED')"
    procs = [
        subprocess.Popen(
            [PY, "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(
                LMJAX_COORDINATOR=f"127.0.0.1:{port}",
                LMJAX_NUM_PROCESSES="2",
                LMJAX_PROCESS_ID=str(i),
                LMJAX_INIT_TIMEOUT="6",
            ),
        )
        for i, port in enumerate(ports)
    ]
    (out0, err0), (out1, err1) = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [distributed.RENDEZVOUS_TIMEOUT_EXIT] * 2
    assert "JOINED" not in out0 + out1
    assert "within 6 s" in err0 and f"hosting the coordinator at 127.0.0.1:{ports[0]}" in err0
    assert f"nothing answers at 127.0.0.1:{ports[1]}" in err1
    assert "LMJAX_NUM_PROCESSES=2" in err1


def test_initialize_after_jax_started_is_refused():
    code = (
        "import jax; jax.devices()\n"
        "from lmjax.parallel import distributed\n"
        "distributed.initialize('127.0.0.1:1', 2, 1)"
    )
    p = subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=120
    )
    assert p.returncode == 1
    assert "must run before any jax computation" in p.stderr
