"""`lmjax doctor` and the preflight of `lmjax train`: the checks on this machine, the verdict of
a job's processes on their reports, and real 2-process jobs started inconsistently (gloo),
each of which ends every process in bounded time with a message naming the cause."""

import subprocess
import sys
import time

import pytest

from lmjax import cli
from lmjax.config import ConfigError
from lmjax.parallel import agreement, distributed
from lmjax.parallel.agreement import Report
from lmjax.tools import doctor
from tests.helpers import clean_env, free_port


def _checks(tmp_path, *sets):
    config = cli.load_experiment("smoke", [f"run.compile_cache_dir={tmp_path}/cache", *sets])
    return {c.name: c for c in doctor.run_checks(config, str(tmp_path / "run"))}


def test_doctor_passes_here_and_names_what_it_checked(tmp_path):
    checks = _checks(tmp_path)
    assert all(c.ok for c in checks.values()), checks
    assert list(checks) == [
        *("versions", "devices", "mesh", "attention", "workdir", "store", "compile cache"),
        "processes",
    ]
    assert "jax 0.1" in checks["versions"].detail and "tested: jax<" in checks["versions"].detail
    assert "x cpu (cpu), process 0 of 1" in checks["devices"].detail
    assert checks["attention"].detail == "xla"
    assert checks["store"].detail == f"{tmp_path}/run/data can be created ({tmp_path} is writable)"
    assert checks["compile cache"].detail.startswith(f"{tmp_path}/cache can be created")
    assert list(tmp_path.iterdir()) == []  # no probe left, no directory made


def test_doctor_fails_a_kernel_this_platform_lacks_a_wrong_platform_and_a_misfit_mesh(tmp_path):
    config = cli.load_experiment("smoke", ["model.attention=splash", "mesh.tensor=3"])
    checks = {c.name: c for c in doctor.run_checks(config, "", expect_platform="gpu")}
    assert [n for n, c in checks.items() if not c.ok] == ["devices", "mesh", "attention"]
    assert "expected gpu" in checks["devices"].detail and "lmjax[gpu]" in checks["devices"].detail
    assert "model.attention=splash runs only on tpu" in checks["attention"].detail
    assert "3 does not divide" in checks["mesh"].detail
    assert checks["workdir"].detail == "not used (no workdir)"


def test_attention_is_the_kernel_of_the_platform_or_xla_when_the_length_does_not_fit():
    fits = cli.load_experiment("smoke", ["data.seq_len=128"])
    assert [doctor.attention_impl(fits, b) for b in ("gpu", "tpu", "cpu")] == [
        "pallas_gpu",
        "splash",
        "xla",
    ]
    assert doctor.attention_impl(cli.load_experiment("smoke"), "tpu") == "xla"  # 64 tokens


def test_preflight_raises_naming_every_failed_check_before_anything_compiles(tmp_path):
    config = cli.load_experiment("smoke", ["model.attention=cudnn"])
    with pytest.raises(
        ConfigError,
        match=r"preflight failed.*\n  attention: model.attention=cudnn runs only on gpu",
    ):
        doctor.preflight(config, str(tmp_path), None)


def test_a_second_process_0_is_refused_before_it_joins():
    r = distributed.Rendezvous("explicit", "10.0.0.2:8476", 4, 0)
    with pytest.raises(ConfigError, match="another process claims index 0.*0..3"):
        distributed._refuse_second_coordinator(r, lambda address: True)
    distributed._refuse_second_coordinator(r, lambda address: False)
    worker = distributed.Rendezvous("explicit", "10.0.0.2:8476", 4, 1)
    distributed._refuse_second_coordinator(worker, lambda address: True)


def _report(index, started_for=2, kind="TPU v5p", config='{"optim": {"lr": 0.1}}', failures=()):
    facts = {"device kind": kind, "config": config}
    return Report(index, f"host{index}", started_for, facts, failures)


def test_disagreements_name_the_processes_the_field_and_the_fix():
    assert agreement.disagreements([_report(0), _report(1)], 2) == []
    found = agreement.disagreements(
        [_report(0), _report(1, 3, "TPU v4", '{"optim": {"lr": 0.2}}')], 2
    )
    assert found == [
        "process 1 (host1) was started for 3 processes but 2 joined: start every process with "
        "the same process count (LMJAX_NUM_PROCESSES, srun --ntasks)",
        "device kind differs between process 0 (host0) and process 1 (host1): 'TPU v5p' vs "
        "'TPU v4'; start every process the same way",
        "config differs between process 0 (host0) and process 1 (host1): optim.lr: 0.1 vs 0.2; "
        "start every process the same way",
    ]
    reports = [_report(0, failures=("store: denied",)), _report(1, failures=("mesh: no",))]
    assert agreement.peer_failures(reports, 1) == ["process 0 (host0): store: denied"]
    assert Report.from_json(reports[0].to_json()) == reports[0]


# --- real 2-process jobs --------------------------------------------------------------------


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


@pytest.mark.slow
def test_a_process_started_for_another_process_count_ends_both_processes():
    """jax admits process 1 of "3" into a job of 2; the preflight's reports catch it."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [_start(["doctor"], coordinator, n, i) for i, n in enumerate((2, 3))]
    for code, out in _finish(procs):
        assert code == 1, out
        assert "[FAIL] processes: process 1 (" in out, out
        assert "was started for 3 processes but 2 joined" in out


@pytest.mark.slow
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


@pytest.mark.slow
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
