"""`lmjax doctor` and the preflight of `lmjax train`: the checks on this machine, the verdict of
a job's processes on their reports, and real 2-process jobs started inconsistently (gloo),
each of which ends every process in bounded time with a message naming the cause."""

import pytest

from lmjax.commands.experiment import load_experiment
from lmjax.config import ConfigError
from lmjax.parallel import agreement, distributed
from lmjax.parallel.agreement import Report
from lmjax.tools import doctor


def _checks(tmp_path, *sets):
    config = load_experiment("smoke", [f"run.compile_cache_dir={tmp_path}/cache", *sets])
    return {c.name: c for c in doctor.run_checks(config, str(tmp_path / "run"))}


def test_doctor_passes_here_and_names_what_it_checked(tmp_path):
    checks = _checks(tmp_path)
    assert all(c.ok for c in checks.values()), checks
    assert list(checks) == [
        *("versions", "devices", "mesh", "attention", "workdir", "data stores", "compile cache"),
        "processes",
    ]
    assert "jax 0.1" in checks["versions"].detail and "tested: jax<" in checks["versions"].detail
    assert "x cpu (cpu), process 0 of 1" in checks["devices"].detail
    assert checks["attention"].detail == "xla"
    assert (
        checks["data stores"].detail
        == f"{tmp_path}/run/data can be created ({tmp_path} is writable)"
    )
    assert checks["compile cache"].detail.startswith(f"{tmp_path}/cache can be created")
    assert list(tmp_path.iterdir()) == []  # no probe left, no directory made


def test_doctor_fails_a_kernel_this_platform_lacks_a_wrong_platform_and_a_misfit_mesh(tmp_path):
    config = load_experiment("smoke", ["model.attention=splash", "mesh.tensor=3"])
    checks = {c.name: c for c in doctor.run_checks(config, "", expect_platform="gpu")}
    assert [n for n, c in checks.items() if not c.ok] == ["devices", "mesh", "attention"]
    assert "expected gpu" in checks["devices"].detail and "lmjax[gpu]" in checks["devices"].detail
    assert "model.attention=splash runs only on tpu" in checks["attention"].detail
    assert "3 does not divide" in checks["mesh"].detail
    assert checks["workdir"].detail == "not used (no workdir)"


def test_attention_is_the_kernel_of_the_platform_or_xla_when_the_length_does_not_fit():
    fits = load_experiment("smoke", ["data.seq_len=128"])
    assert [doctor.attention_impl(fits, b) for b in ("gpu", "tpu", "cpu")] == [
        "pallas_gpu",
        "splash",
        "xla",
    ]
    assert doctor.attention_impl(load_experiment("smoke"), "tpu") == "xla"  # 64 tokens


def test_preflight_raises_naming_every_failed_check_before_anything_compiles(tmp_path):
    config = load_experiment("smoke", ["model.attention=cudnn"])
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
    reports = [_report(0, failures=("data stores: denied",)), _report(1, failures=("mesh: no",))]
    assert agreement.peer_failures(reports, 1) == ["process 0 (host0): data stores: denied"]
    assert Report.from_json(reports[0].to_json()) == reports[0]
