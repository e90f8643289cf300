"""Whole training runs killed, stopped, torn and resumed: `python -m lmjax train` subprocesses
on the smoke experiment (packaged Shakespeare corpus, real tf.data and orbax).

The reference run trains the tokenizer and prepares the data store once; the other runs
reuse both (data.tokenizer, data.store_dir), so each costs a process start and a compile.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from launch.local import free_port, process_env
from lmjax import cli
from lmjax.observe import metrics
from lmjax.tools import soak
from tests.configs import smoke_train_args
from tests.helpers import REPO

STEPS = 12
BASE = smoke_train_args(STEPS)


def _env(devices: int = 8) -> dict:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("LMJAX_NUM_PROCESSES", None)
    return env


def _command(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "lmjax", "train", "--workdir", str(workdir), *BASE, *extra]


def _run(workdir, *extra, devices: int = 8, expect: int = 0) -> subprocess.CompletedProcess:
    out = subprocess.run(
        _command(workdir, *extra),
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert out.returncode == expect, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _losses_after_last_start(workdir) -> tuple[int, dict[int, float]]:
    """(restored step, {step: loss}) of the run segment after the last resume record."""
    records = metrics.read_records(workdir)
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    assert starts, "the resumed run did not note its resume in its records"
    restored = records[starts[-1]]["restored_step"]
    return restored, {r["step"]: r["loss"] for r in records[starts[-1] + 1 :] if "loss" in r}


def _logged_steps(workdir) -> list[int]:
    """Steps whose loss is in the run's records so far."""
    return [r["step"] for r in metrics.read_records(workdir, missing_ok=True) if "loss" in r]


def _committed_steps(workdir) -> list[int]:
    root = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _wait_for(predicate, proc, timeout=300.0, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"run exited with {proc.returncode} before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _kill_at_a_random_step(workdir, proc, steps: int, pids) -> None:
    """SIGKILLs `pids()` once the first checkpoint is committed and a random later step is
    logged (metrics arrive one step late, so the run is still training then)."""
    target = random.randint(5, steps - 2)
    _wait_for(
        lambda: _committed_steps(workdir) and max(_logged_steps(workdir), default=0) >= target,
        proc,
        timeout=500,
        what=f"checkpoint 4 and step {target}",
    )
    time.sleep(random.uniform(0.0, 0.05))
    victims = pids()
    assert proc.poll() is None and victims, "the run ended before it could be killed"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: workdir, {step: loss}, and the overrides that reuse its data."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir)
    shared = [
        "--set",
        f"data.tokenizer={workdir / 'tokenizer.model'}",
        "--set",
        f"data.store_dir={workdir / 'data'}",
    ]
    losses = {r["step"]: r["loss"] for r in metrics.read_records(workdir) if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert _committed_steps(workdir) == [4, 8, 12]
    return workdir, losses, shared


@pytest.mark.parametrize("moment", ["first save", "async save"])
def test_sigkill_inside_a_save_then_resume_is_bitwise_identical(reference, tmp_path, moment):
    """The small kill soak (`lmjax soak` runs 10 trials, random steps included): SIGKILL while
    the first or a later async save is being written, rerun, every loss equals the
    uninterrupted run's."""
    ref_dir, _, shared = reference
    row = soak.run_trial(
        moment,
        _command(tmp_path, *shared),
        _env(),
        tmp_path,
        STEPS,
        soak.losses(ref_dir),
        random.Random(0),
    )
    assert row["killed"] and row["rerun_exit"] == 0, row
    assert row["equal"], row
    assert row["restored"] == max(row["committed"], default=0), row


def test_lmjax_soak_prints_each_trial_and_the_tally(tmp_path, capsys):
    """`lmjax soak` with one trial: the library hands the row to the command, which prints it."""
    assert cli.main(["soak", "--workdir", str(tmp_path), "--trials", "1", "--steps", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("trial  0  first save") and lines[0].endswith("ok"), lines
    assert lines[-1].startswith("1/1 trials resumed bit for bit"), lines


def test_sigterm_saves_within_a_step_then_torn_checkpoint_and_mesh_change(reference, tmp_path):
    _, ref_losses, shared = reference
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            _command(tmp_path, *shared), env=_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
        _wait_for(
            lambda: len(_logged_steps(tmp_path)) >= 5 and 4 in _committed_steps(tmp_path),
            proc,
            what="step 5 and checkpoint 4",
        )
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    output = log_path.read_text()
    assert proc.returncode == 0, output[-3000:]
    stopped = max(_committed_steps(tmp_path))
    assert stopped < STEPS and max(_logged_steps(tmp_path)) == stopped, output[-3000:]
    # the progress line of step k prints one step late, at the boundary of step k + 1; the
    # signal handler's line shows when the signal arrived, so the save is at k + 1 or k + 2
    before = output[: output.index("received SIGTERM")]
    progress = [line for line in before.splitlines() if f"/{STEPS} grad_norm" in line]
    last_logged = int(progress[-1].split()[1].split("/")[0])  # "step 6/12 grad_norm=..."
    assert stopped - last_logged in (1, 2), (last_logged, stopped)
    assert f"checkpoint {stopped}: committed" in output and "stopped at step" in output

    # tear the newest checkpoint (truncate its parameter files), then resume on another mesh:
    # 4 devices instead of 8, fsdp 2 x tensor 2 instead of fsdp 8
    previous = _committed_steps(tmp_path)[-2]
    for path in (tmp_path / "checkpoints" / str(stopped) / "params").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:10])
    out = _run(tmp_path, *shared, "--set", "mesh.fsdp=2", "--set", "mesh.tensor=2", devices=4)
    assert f"step {stopped} is unreadable" in out.stderr
    assert "mesh {'data': 1, 'fsdp': 2, 'expert': 1, 'tensor': 2}" in out.stderr
    assert "resuming with a changed config: mesh.fsdp" in out.stderr
    restored, losses = _losses_after_last_start(tmp_path)
    assert restored == previous < stopped
    assert sorted(losses) == list(range(previous + 1, STEPS + 1))
    np.testing.assert_allclose(
        [losses[s] for s in losses], [ref_losses[s] for s in losses], rtol=1e-5
    )
    assert _committed_steps(tmp_path)[-1] == STEPS
    assert any(
        p.name.startswith(f"{stopped}-")
        for p in (tmp_path / "checkpoints" / "unreadable").iterdir()
    )


def test_model_shape_change_is_refused_with_the_fields(reference, tmp_path):
    ref_dir, _, shared = reference
    work = tmp_path / "copy"
    shutil.copytree(ref_dir, work, ignore=shutil.ignore_patterns("tensorboard"))
    before = (work / "config.json").read_text()
    out = _run(
        work,
        *shared,
        "--set",
        "model.d_mlp=128",
        "--set",
        "model.n_layers=3",
        "--set",
        "run.steps=20",
        expect=2,
    )
    assert "model.d_mlp: checkpoint 192, now 128" in out.stderr
    assert "model.n_layers: checkpoint 2, now 3" in out.stderr
    assert "run.steps" not in out.stderr
    assert (work / "config.json").read_text() == before
    assert _committed_steps(work) == [4, 8, 12]


def test_turning_clipping_off_on_resume_keeps_every_checkpoint(reference, tmp_path):
    """optim.clip_norm=0 drops the clipping wrapper from the optimizer state: the resume
    restores the saved moments into the new layout and continues; nothing is set aside."""
    ref_dir, _, shared = reference
    work = tmp_path / "copy"
    shutil.copytree(ref_dir, work, ignore=shutil.ignore_patterns("tensorboard"))
    out = _run(work, *shared, "--set", "optim.clip_norm=0", "--set", f"run.steps={STEPS + 2}")
    assert "layout changed" in out.stderr and "unreadable" not in out.stderr
    restored, losses = _losses_after_last_start(work)
    assert restored == STEPS and sorted(losses) == [STEPS + 1, STEPS + 2]
    assert _committed_steps(work) == [8, 12, 14]
    assert not (work / "checkpoints" / "unreadable").exists()


def test_a_nonfinite_loss_never_reaches_disk(reference, tmp_path):
    _, _, shared = reference
    out = _run(
        tmp_path, *shared, "--set", "optim.lr=1e30", "--set", "checkpoint.every_steps=1", expect=1
    )
    message = [line for line in out.stderr.splitlines() if "non-finite" in line][-1]
    bad_step = int(message.split("step ")[1].split(":")[0].split()[0])
    saved = _committed_steps(tmp_path)
    assert saved and max(saved) < bad_step, (saved, message)
    from lmjax.checkpoint import checkpointer, listing

    reader = checkpointer.Checkpointer(str(tmp_path / "checkpoints"), read_only=True)
    for step in saved:
        _, params, _ = listing.load_params(str(tmp_path), step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
        assert reader.read_json(step, "meta")["step"] == step


def test_two_processes_sigkill_then_resume_is_bitwise_identical(reference, tmp_path):
    """2 processes x 4 devices (gloo): an uninterrupted run through launch/local.py; a run whose
    process 1 is SIGKILLed after a checkpoint, so that process 0 exits on the heartbeat
    timeout naming it, then resumed by the same command. Gloo reduces in
    another order than one process does, so the 2-process run is its own reference. Then the
    2-process checkpoint restores into one process."""
    _, ref_losses, shared = reference
    steps = 8

    def launch(workdir):
        return [
            sys.executable,
            str(REPO / "launch" / "local.py"),
            "--processes",
            "2",
            "--devices-per-process",
            "4",
            "--",
            "lmjax",
            "train",
            "--workdir",
            str(workdir),
            *BASE,
            *shared,
            "--set",
            f"run.steps={steps}",
        ]

    env = _env()
    env.pop("XLA_FLAGS")
    whole = subprocess.run(
        launch(tmp_path / "whole"), env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert whole.returncode == 0, whole.stdout[-4000:]
    whole_losses = {
        r["step"]: r["loss"] for r in metrics.read_records(tmp_path / "whole") if "loss" in r
    }
    assert sorted(whole_losses) == list(range(1, steps + 1))
    first = min(whole_losses)  # the same numbers as one process, up to summation order
    np.testing.assert_allclose(whole_losses[first], ref_losses[first], rtol=1e-5)

    # a dead peer: the two processes run without a launcher that would stop the survivor;
    # process 1 is SIGKILLed, process 0 must notice within the heartbeat timeout and exit
    work = tmp_path / "killed"
    coordinator, heartbeat = f"127.0.0.1:{free_port()}", 10
    survivor_log = tmp_path / "p0.log"
    command = [
        sys.executable,
        "-m",
        "lmjax",
        "train",
        "--workdir",
        str(work),
        *BASE,
        *shared,
        "--set",
        f"run.steps={steps}",
    ]
    with open(survivor_log, "w") as log:
        procs = [
            subprocess.Popen(
                command,
                cwd=REPO,
                stdout=log if i == 0 else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env={
                    **process_env(env, coordinator, 2, i, 4),
                    "LMJAX_HEARTBEAT_TIMEOUT": str(heartbeat),
                },
            )
            for i in range(2)
        ]
        try:
            _kill_at_a_random_step(work, procs[0], steps, lambda: [procs[1].pid])
            killed_at, committed = time.monotonic(), _committed_steps(work)
            assert procs[0].wait(timeout=heartbeat + 120) != 0
            waited = time.monotonic() - killed_at
        finally:
            for p in procs:
                p.kill()
                p.wait()
    assert "tasks are unhealthy (stopped sending heartbeats):\n1\n" in survivor_log.read_text()
    assert waited < heartbeat + 120, waited
    assert _committed_steps(work) == committed  # nothing committed lost or half-written
    # a torn step newer than every committed one: both processes skip it, and the first save
    # sets it aside once (process 0 moves it, both pass the same barrier)
    torn = work / "checkpoints" / str(max(committed) + 1)
    shutil.copytree(work / "checkpoints" / str(max(committed)), torn)
    for path in (torn / "params").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:10])
    out = subprocess.run(
        launch(work), env=env, cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-4000:]
    assert f"step {torn.name} is unreadable" in out.stdout
    assert any(p.name.startswith(f"{torn.name}-") for p in (torn.parent / "unreadable").iterdir())
    restored, losses = _losses_after_last_start(work)
    assert restored == max(committed)
    assert sorted(losses) == list(range(restored + 1, steps + 1))
    meta = json.loads((work / "checkpoints" / str(steps) / "meta" / "metadata").read_text())
    assert meta["process_count"] == 2
    for step, loss in losses.items():
        assert loss == whole_losses[step], (step, loss, whole_losses[step])

    # the 2-process checkpoint continues in one process with 8 devices: same numbers up to
    # summation order, and the data position carries over
    _run(
        tmp_path / "single",
        *shared,
        "--set",
        f"run.steps={steps}",
        "--restore-from",
        str(work / "checkpoints" / "4"),
    )
    restored, losses = _losses_after_last_start(tmp_path / "single")
    assert restored == 4 and sorted(losses) == list(range(5, steps + 1))
    np.testing.assert_allclose(
        [losses[s] for s in losses], [whole_losses[s] for s in losses], rtol=1e-5
    )
