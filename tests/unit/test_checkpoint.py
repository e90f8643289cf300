"""The checkpoint module on real orbax, in-process: saving, keeping, refusing non-finite
state, restoring onto another mesh, resume rules, export and params-only loading.

Whole training runs (SIGKILL, SIGTERM, torn checkpoints, device-count changes) are in
tests/integration/test_resume.py.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import config as config_lib, errors
from lmjax.checkpoint import (
    checkpointer,
    compat,
    listing,
    paths,
    resume,
    schedule as schedule_lib,
)
from lmjax.config import (
    CheckpointConfig,
    ConfigError,
    MeshConfig,
)
from lmjax.config_checks import validate
from lmjax.config_overrides import apply_overrides
from lmjax.parallel import sharding
from lmjax.train import optim, trainer as trainer_lib
from tests.configs import TINY_RUN


def _trainer(config=TINY_RUN, devices=None):
    return trainer_lib.make_trainer(config, sharding.make_mesh(config.mesh, devices))


def _device_state(trainer, host_state):
    return jax.tree.map(jax.device_put, host_state, trainer.state_shardings)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {"note": "test"}


def test_nonfinite_state_or_step_is_never_saved(tmp_path, trained):
    trainer, states, metrics = trained
    ckpt = checkpointer.Checkpointer(str(tmp_path / "ck"), TINY_RUN.checkpoint)
    good = _device_state(trainer, states[0])
    with pytest.raises(FloatingPointError, match="step 1"):
        ckpt.save(1, good, data_state={}, meta=META, step_finite=jnp.bool_(False))
    bad_host = states[1]
    bad = _device_state(
        trainer,
        bad_host.replace(
            opt_state=jax.tree.map(
                lambda x: np.full_like(x, np.inf) if x.dtype == np.float32 else x,
                bad_host.opt_state,
            )
        ),
    )
    with pytest.raises(FloatingPointError, match="step 2"):
        ckpt.save(2, bad, data_state={}, meta=META, step_finite=True)
    # on_nonfinite=skip kept the old params: the state is finite, so it may be saved
    ckpt.save(3, good, data_state={}, meta=META, step_finite=False, allow_nonfinite_step=True)
    ckpt.close()
    assert checkpointer.Checkpointer(str(tmp_path / "ck"), read_only=True).steps() == [3]


def test_restore_onto_another_mesh(tmp_path, trained):
    trainer, states, metrics = trained
    ckpt = checkpointer.Checkpointer(str(tmp_path / "ck"), TINY_RUN.checkpoint)
    ckpt.save(4, _device_state(trainer, states[3]), data_state={}, meta=META)
    ckpt.close()
    other_cfg = dataclasses.replace(TINY_RUN, mesh=MeshConfig(fsdp=1, tensor=2, data=2))
    other = _trainer(other_cfg, jax.devices()[:4])
    target = checkpointer.abstract_state(other.init_fn, other.state_shardings)
    restored, _ = checkpointer.Checkpointer(str(tmp_path / "ck"), read_only=True).restore(4, target)
    _assert_trees_equal(restored, states[3])
    wq = restored.params["layers"]["wq"]
    assert wq.sharding == other.state_shardings.params["layers"]["wq"]
    assert len(wq.sharding.device_set) == 4


def test_resume_rules_refuse_model_and_tokenizer_changes():
    meta = {
        "config": config_lib.to_dict(TINY_RUN),
        "param_layout_version": 1,
        "tokenizer_fingerprint": "abc",
    }
    allowed = apply_overrides(
        TINY_RUN,
        ["run.steps=50", "optim.lr=1e-3", "run.log_every=3", "model.remat=full", "mesh.tensor=2"],
    )
    changes = compat.check_resumable(meta, allowed, "ck step 5")
    assert set(changes) == {"run.steps", "optim.lr", "run.log_every", "model.remat", "mesh.tensor"}
    refused = apply_overrides(
        TINY_RUN,
        ["model.d_model=64", "model.n_layers=3", "run.steps=50", "data.tokenizer_vocab_size=1000"],
    )
    with pytest.raises(compat.ResumeError) as e:
        compat.check_resumable(meta, refused, "ck step 5")
    message = str(e.value)
    for field in ("model.d_model", "model.n_layers", "data.tokenizer_vocab_size"):
        assert field in message
    assert "run.steps" not in message
    assert isinstance(e.value, ConfigError)
    with pytest.raises(compat.ResumeError, match="tokenizer"):
        compat.check_tokenizer(meta, "def", "ck step 5")
    with pytest.raises(compat.ResumeError, match="layout version"):
        compat.check_resumable({**meta, "param_layout_version": 0}, TINY_RUN, "ck step 5")
    # a batch-size ramp or a context extension only when asked for, field by field
    ramp = ["data.batch_size=16", "data.seq_len=32", "model.rope_theta=5e5"]
    with pytest.raises(compat.ResumeError, match="accept_changes") as e:
        compat.check_resumable(meta, apply_overrides(TINY_RUN, ramp), "ck step 5")
    assert all(f.split("=")[0] in str(e.value) for f in ramp)
    partly = apply_overrides(TINY_RUN, [*ramp, "checkpoint.accept_changes=data.batch_size"])
    with pytest.raises(compat.ResumeError) as e:
        compat.check_resumable(meta, partly, "ck step 5")
    assert "data.seq_len" in str(e.value) and "data.batch_size:" not in str(e.value)
    accepted = "checkpoint.accept_changes=data.batch_size,data.seq_len,model.rope_theta"
    assert set(compat.check_resumable(meta, apply_overrides(TINY_RUN, [*ramp, accepted]), "c")) == {
        "data.batch_size",
        "data.seq_len",
        "model.rope_theta",
        "checkpoint.accept_changes",
    }
    with pytest.raises(ConfigError, match="model.d_model.. cannot change on a resume"):
        validate(apply_overrides(TINY_RUN, ["checkpoint.accept_changes=model.d_model"]))


def _save_run(workdir, trainer, host_states, steps, config=TINY_RUN):
    ckpt = checkpointer.Checkpointer(paths.checkpoint_dir(str(workdir)), config.checkpoint)
    mesh = trainer.mesh
    for step in steps:
        ckpt.save(
            step,
            _device_state(trainer, host_states[step - 1]),
            data_state={"pos": step},
            meta=compat.make_metadata(config, None, mesh),
        )
    ckpt.close()


def _tear(step_dir, item="params"):
    """Empties every array file and manifest of one item of a step (a torn write)."""
    for root, _, files in os.walk(step_dir / item):
        for name in files:
            if "/d" in root or name.endswith(".ocdbt"):
                open(os.path.join(root, name), "w").close()


def test_torn_step_is_skipped_at_resume_and_set_aside_by_the_save_that_needs_its_slot(
    tmp_path, trained, caplog
):
    trainer, states, _ = trained
    _save_run(tmp_path, trainer, states, [2, 4])
    _tear(tmp_path / "checkpoints" / "4")
    decision = resume.decide_resume(str(tmp_path), TINY_RUN)
    assert [c.step for c in decision.candidates] == [4, 2]
    state, data_state, source = decision.load(
        trainer.init_fn, trainer.state_shardings, str(tmp_path), TINY_RUN.model
    )
    assert source.endswith("step 2") and data_state["pos"] == 2
    _assert_trees_equal(state, states[1])
    assert [s for _, s, _ in decision.unreadable] == [4]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # resume moves nothing
    assert not (tmp_path / "checkpoints" / "unreadable").exists()
    # the run continues from 2; its save at 4 sets the torn 4 aside (logged) and writes 4
    ckpt = checkpointer.Checkpointer(
        paths.checkpoint_dir(str(tmp_path)), TINY_RUN.checkpoint, resumed_at=2
    )
    with caplog.at_level("WARNING", logger="lmjax"):
        ckpt.save(
            4,
            _device_state(trainer, states[3]),
            data_state={"pos": 4},
            meta=compat.make_metadata(TINY_RUN, None, trainer.mesh),
        )
    ckpt.close()
    assert [r for r in caplog.messages if "moved checkpoint directory" in r and "/4" in r]
    assert os.listdir(tmp_path / "checkpoints" / "unreadable")[0].startswith("4-")
    restored, _ = checkpointer.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).restore(
        4, checkpointer.abstract_state(trainer.init_fn, trainer.state_shardings)
    )
    _assert_trees_equal(restored, states[3])
    # eval and generate read the newest readable step
    _tear(tmp_path / "checkpoints" / "4")
    _, params, _ = listing.load_params(str(tmp_path))
    _assert_trees_equal(params, states[1].params)


def test_decide_resume_never_starts_from_scratch_over_unreadable_checkpoints(tmp_path, trained):
    trainer, states, _ = trained
    _save_run(tmp_path, trainer, states, [3])
    for root, _, files in os.walk(tmp_path / "checkpoints" / "3" / "train"):
        for name in files:
            os.remove(os.path.join(root, name))
    decision = resume.decide_resume(str(tmp_path), TINY_RUN)
    with pytest.raises(compat.ResumeError, match="none could be read.*allow_fresh"):
        decision.load(trainer.init_fn, trainer.state_shardings, str(tmp_path), TINY_RUN.model)
    assert os.listdir(tmp_path / "checkpoints") == ["3"]
    # asked to: a fresh start; the first save sets the unreadable step aside
    fresh = apply_overrides(TINY_RUN, ["checkpoint.allow_fresh=true"])
    decision = resume.decide_resume(str(tmp_path), fresh)
    state, data_state, source = decision.load(
        trainer.init_fn, trainer.state_shardings, str(tmp_path), TINY_RUN.model
    )
    assert source == "fresh init" and int(state.step) == 0 and data_state is None
    ckpt = checkpointer.Checkpointer(
        paths.checkpoint_dir(str(tmp_path)), TINY_RUN.checkpoint, resumed_at=0
    )
    ckpt.save(1, _device_state(trainer, states[0]), data_state={}, meta=META)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "unreadable"]
    assert os.listdir(tmp_path / "checkpoints" / "unreadable")[0].startswith("3-")


def _clip_trainer(clip_norm):
    return _trainer(apply_overrides(TINY_RUN, [f"optim.clip_norm={clip_norm}"]))


@pytest.mark.parametrize("saved_clip, new_clip", [(1.0, 0.0), (0.0, 1.0)])
def test_clipping_change_restores_the_saved_moments_into_the_new_layout(
    tmp_path, trained, saved_clip, new_clip
):
    """optim.clip_norm on <-> off adds or drops a stateless wrapper around AdamW: the saved
    moments, counts, step and params come back in the new layout, value for value."""
    _, states, _ = trained  # trained with clipping (TINY_RUN's clip_norm=1.0)
    saver = _clip_trainer(saved_clip)
    layout = jax.eval_shape(saver.init_fn).opt_state
    host = states[4].replace(
        opt_state=jax.tree.unflatten(
            jax.tree.structure(layout), jax.tree.leaves(states[4].opt_state)
        )
    )
    _save_run(
        tmp_path,
        saver,
        states[:4] + [host],
        [5],
        config=apply_overrides(TINY_RUN, [f"optim.clip_norm={saved_clip}"]),
    )
    loader = _clip_trainer(new_clip)
    config = apply_overrides(TINY_RUN, [f"optim.clip_norm={new_clip}"])
    decision = resume.decide_resume(str(tmp_path), config)
    restored, _, source = decision.load(
        loader.init_fn, loader.state_shardings, str(tmp_path), config.model
    )
    assert source.endswith("step 5") and int(restored.step) == 5
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(
        jax.eval_shape(loader.init_fn).opt_state
    )
    _assert_trees_equal(restored.params, host.params)
    new_opt = jax.tree.leaves(restored.opt_state)
    _assert_trees_equal(jax.tree.leaves(host.opt_state), new_opt)  # counts, mu, nu in order
    assert [int(x) for x in new_opt if np.ndim(x) == 0] == [5, 5]
    adam = restored.opt_state[0] if new_clip == 0 else restored.opt_state[1][0]
    assert adam.mu["embed"].sharding == loader.state_shardings.params["embed"]


def test_a_state_structure_the_config_cannot_take_is_refused_before_anything_moves(
    tmp_path, trained, monkeypatch
):
    import optax

    trainer, states, _ = trained
    _save_run(tmp_path, trainer, states, [2, 4])
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    # an optimizer with other state (SGD momentum: one trace per parameter, no counts)
    monkeypatch.setattr(optim, "make_optimizer", lambda cfg, steps: optax.sgd(0.1, momentum=0.9))
    config = apply_overrides(TINY_RUN, ["optim.b1=0.8"])
    other = _trainer(config)
    decision = resume.decide_resume(str(tmp_path), config)
    with pytest.raises(compat.ResumeError) as e:
        decision.load(other.init_fn, other.state_shardings, str(tmp_path), config.model)
    message = str(e.value)
    assert "step 4" in message and "optim.b1: 0.9 -> 0.8" in message
    assert "only saved" in message and "No checkpoint was moved" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    assert not (tmp_path / "checkpoints" / "unreadable").exists()


def test_storage_faults_are_retried_and_never_count_as_torn(tmp_path, trained, monkeypatch):
    import errno

    trainer, states, _ = trained
    _save_run(tmp_path, trainer, states, [2, 4])
    monkeypatch.setattr(checkpointer, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    real_restore = checkpointer.Checkpointer.restore
    failures = []

    def flaky(errors):
        def restore(self, step, target):
            if len(failures) < errors:
                failures.append(step)
                raise OSError(errno.EIO, "Input/output error")
            return real_restore(self, step, target)

        return restore

    def decide_and_load():
        decision = resume.decide_resume(str(tmp_path), TINY_RUN)
        return decision.load(
            trainer.init_fn, trainer.state_shardings, str(tmp_path), TINY_RUN.model
        )

    monkeypatch.setattr(checkpointer.Checkpointer, "restore", flaky(2))
    state, _, source = decide_and_load()  # two failures, then the third attempt reads step 4
    assert source.endswith("step 4") and failures == [4, 4]
    _assert_trees_equal(state, states[3])
    failures.clear()
    monkeypatch.setattr(checkpointer.Checkpointer, "restore", flaky(100))
    with pytest.raises(errors.FaultError, match="kept failing after 3 retries"):
        decide_and_load()
    assert len(failures) == 4  # one attempt and 3 retries of step 4, then stop: 2 untried

    def out_of_memory(self, step, target):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")

    monkeypatch.setattr(checkpointer.Checkpointer, "restore", out_of_memory)
    with pytest.raises(compat.ResumeError, match="out of memory restoring .*step 4"):
        decide_and_load()

    def bug(self, step, target):
        raise ValueError("some internal mismatch")

    monkeypatch.setattr(checkpointer.Checkpointer, "restore", bug)
    with pytest.raises(errors.FaultError, match="some internal mismatch"):
        decide_and_load()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert not (tmp_path / "checkpoints" / "unreadable").exists()


def test_restore_from_step_and_path(tmp_path, trained):
    trainer, states, _ = trained
    _save_run(tmp_path / "a", trainer, states, [2, 5])
    with pytest.raises(compat.ResumeError, match="later steps"):
        resume.decide_resume(str(tmp_path / "a"), TINY_RUN, restore_from="2")
    with pytest.raises(compat.ResumeError, match="no committed step 3"):
        resume.decide_resume(str(tmp_path / "a"), TINY_RUN, restore_from="3")
    decision = resume.decide_resume(
        str(tmp_path / "b"), TINY_RUN, restore_from=str(tmp_path / "a" / "checkpoints" / "2")
    )
    assert [(c.directory, c.step) for c in decision.candidates] == [
        (str(tmp_path / "a" / "checkpoints"), 2)
    ]
    decision = resume.decide_resume(str(tmp_path / "b"), TINY_RUN, restore_from=str(tmp_path / "a"))
    assert [c.step for c in decision.candidates] == [5, 2]
    with pytest.raises(compat.ResumeError, match="no committed checkpoint"):
        resume.decide_resume(str(tmp_path / "b"), TINY_RUN, restore_from=str(tmp_path / "nothing"))


def test_list_checkpoints_reports_complete_and_uncommitted(tmp_path, trained):
    trainer, states, _ = trained
    _save_run(tmp_path, trainer, states, [1, 2])
    os.makedirs(tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-123" / "params")
    rows = listing.list_checkpoints(str(tmp_path))
    assert [(r["step"], r["complete"]) for r in rows] == [(1, True), (2, True), (3, False)]
    assert rows[0]["bytes"] > 1000 and rows[0]["process_count"] == 1
    assert rows[1]["mesh_shape"] == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    table = listing.format_listing(rows)
    assert "not committed" in table and len(table.splitlines()) == 4


def test_save_schedule():
    cfg = CheckpointConfig(every_steps=4, keep_every=6)
    signals = schedule_lib.StopSignals()
    schedule = schedule_lib.SaveSchedule(cfg, 10, signals)
    decisions = {s: schedule(s) for s in range(1, 11)}
    assert [s for s, (save, _) in decisions.items() if save] == [4, 6, 8, 10]
    assert not any(stop for _, stop in decisions.values())
    with signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM
        assert schedule(3) == (True, True)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    timed = schedule_lib.SaveSchedule(
        CheckpointConfig(every_steps=1000, every_minutes=0.002), 10, schedule_lib.StopSignals()
    )
    assert timed(1) == (False, False)
    time.sleep(0.2)
    assert timed(2) == (True, False)
    timed.saved()
    assert timed(3) == (False, False)


def test_second_signal_exits_at_once():
    code = textwrap.dedent("""
        import os, signal, time
        from lmjax.checkpoint import schedule
        with schedule.StopSignals() as s:
            os.kill(os.getpid(), signal.SIGTERM)
            print("first", s.received == signal.SIGTERM, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("still alive", flush=True)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert out.stdout.strip() == "first True"
    assert out.returncode == -signal.SIGTERM


def test_a_save_that_fails_after_the_lease_was_lost_names_the_lease(tmp_path, trained):
    """A holder that hung past its lease timeout finds, woken, that its save in flight fails
    (the run that took over set its unfinished step aside): the error names the lost lease,
    not the storage."""
    trainer, states, _ = trained
    lost = []
    ckpt = checkpointer.Checkpointer(
        str(tmp_path / "checkpoints"),
        TINY_RUN.checkpoint,
        lease_lost=lambda: lost[0] if lost else None,
    )
    ckpt.save(1, _device_state(trainer, states[0]), data_state={}, meta=META)
    ckpt.wait()
    lost.append("taken over by host h, pid 1")

    def set_aside(*args, **kwargs):
        raise ValueError("Checkpoint directory does not exist: .../2.orbax-checkpoint-tmp")

    ckpt._manager.save = set_aside
    with pytest.raises(errors.FaultError, match=r"after the workdir's lease was lost \(taken"):
        ckpt.save(2, _device_state(trainer, states[1]), data_state={}, meta=META)
    ckpt.close()


def test_a_full_disk_stops_the_run_cleanly_and_keeps_the_last_checkpoint(
    tmp_path, trained, small_disk, monkeypatch
):
    import errno

    trainer, states, _ = trained
    directory = str((small_disk or tmp_path) / "checkpoints")
    ckpt = checkpointer.Checkpointer(directory, TINY_RUN.checkpoint)
    ckpt.save(1, _device_state(trainer, states[0]), data_state={}, meta=META)
    ckpt.wait()
    if small_disk is None:  # no tmpfs: the write itself reports ENOSPC

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ckpt._manager, "save", full)
    else:  # fill the disk, leaving less than a checkpoint
        (small_disk / "ballast").write_bytes(
            b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - 20000)
        )
    with pytest.raises(
        errors.FaultError,
        match=r"checkpoint 2 could not be written .*"
        r"newest committed checkpoint, 1, is untouched",
    ):
        ckpt.save(2, _device_state(trainer, states[1]), data_state={}, meta=META)
        ckpt.wait()
    ckpt.close()
    reader = checkpointer.Checkpointer(directory, read_only=True)
    assert reader.steps() == [1]
    restored, _ = reader.restore(
        1, checkpointer.abstract_state(trainer.init_fn, trainer.state_shardings)
    )
    _assert_trees_equal(restored, states[0])
