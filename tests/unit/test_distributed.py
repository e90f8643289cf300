"""lmjax.parallel.distributed: rendezvous choice, hints, and real 2-process runs over gloo."""

import subprocess
import sys

import jax
import pytest

from lmjax.config import ConfigError
from lmjax.parallel import distributed
from lmjax.parallel.distributed import Rendezvous, choose_rendezvous, rendezvous_hint
from tests.helpers import RENDEZVOUS_VARS, clean_env

PY = sys.executable


def test_nothing_set_is_single_process():
    assert choose_rendezvous({}).kind == "single"
    assert choose_rendezvous({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).kind == "single"


def test_explicit_from_environment_and_arguments_win():
    env = {
        "LMJAX_COORDINATOR": "10.0.0.2:8476",
        "LMJAX_NUM_PROCESSES": "4",
        "LMJAX_PROCESS_ID": "3",
    }
    assert choose_rendezvous(env) == Rendezvous("explicit", "10.0.0.2:8476", 4, 3)
    assert choose_rendezvous(env, process_id=1) == Rendezvous("explicit", "10.0.0.2:8476", 4, 1)
    assert choose_rendezvous({}, "h:1", 2, 0) == Rendezvous("explicit", "h:1", 2, 0)
    assert choose_rendezvous({"LMJAX_NUM_PROCESSES": "1"}).kind == "single"


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
        choose_rendezvous(env)


def test_slurm_detected_under_srun_and_refused_outside_it():
    step = {
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_NODELIST": "node[001-004]",
    }
    assert choose_rendezvous(step) == Rendezvous("slurm", None, 16, 5)
    batch_only = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "16"}
    with pytest.raises(ValueError, match="srun"):
        choose_rendezvous(batch_only)
    # Explicit settings beat SLURM's.
    explicit = dict(step, LMJAX_COORDINATOR="h:1", LMJAX_NUM_PROCESSES="2", LMJAX_PROCESS_ID="1")
    assert choose_rendezvous(explicit).kind == "explicit"


def test_one_process_commands_refuse_several_from_the_environment_alone():
    batch_script = {"SLURM_JOB_ID": "4", "SLURM_NTASKS": "16"}  # outside srun: one process
    for alone in ({}, {"LMJAX_NUM_PROCESSES": "1"}, {**batch_script, "SLURM_NTASKS": "1"}):
        distributed.require_one_process("lmjax convert from-hf", alone)
    distributed.require_one_process("lmjax convert from-hf", batch_script)
    explicit = {"LMJAX_COORDINATOR": "h:1", "LMJAX_NUM_PROCESSES": "2", "LMJAX_PROCESS_ID": "1"}
    srun = {
        "SLURM_JOB_ID": "42",
        "SLURM_NTASKS": "16",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_STEP_NODELIST": "node[001-004]",
    }
    for env, started in ((explicit, r"2 processes \(explicit"), (srun, r"16 processes \(slurm")):
        with pytest.raises(ConfigError, match=rf"convert from-hf was started as {started}.*one"):
            distributed.require_one_process("lmjax convert from-hf", env)


def test_cloud_tpu_uses_jax_auto_detection():
    assert choose_rendezvous({}, on_cloud_tpu=True) == Rendezvous("tpu")
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
