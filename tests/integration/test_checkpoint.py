"""The checkpoint module on real orbax, in-process: saving, keeping, refusing non-finite
state, restoring onto another mesh, resume rules, export and params-only loading.

Whole training runs (SIGKILL, SIGTERM, torn checkpoints, device-count changes) are in
tests/integration/test_resume.py.
"""

import dataclasses
import os

import jax
import pytest

from lmjax.checkpoint import (
    checkpointer,
    compat,
    listing,
    params_dir,
    resume,
)
from lmjax.config import (
    ConfigError,
)
from lmjax.model import transformer
from lmjax.parallel import sharding
from tests.configs import TINY_RUN
from tests.unit.test_checkpoint import META, _assert_trees_equal, _device_state, _save_run


def _assert_split_over_local_devices(params, model_cfg):
    """Every parameter with an `embed` dimension lies in equal parts on all local devices
    (offline commands never hold the model on one device); the rest is replicated."""
    n = jax.local_device_count()
    axes = jax.tree.leaves(transformer.param_axes(model_cfg), is_leaf=sharding.is_axes)
    for x, names in zip(jax.tree.leaves(params), axes, strict=True):
        assert len(x.sharding.device_set) == n
        parts = n if "embed" in names else 1
        assert all(s.data.size * parts == x.size for s in x.addressable_shards), names


def test_save_keeps_newest_and_milestones_and_restores_bitwise(tmp_path, trained):
    trainer, states, metrics = trained
    ckpt = checkpointer.Checkpointer(str(tmp_path / "ck"), TINY_RUN.checkpoint)
    for step, (host, m) in enumerate(zip(states, metrics), start=1):
        ckpt.save(
            step,
            _device_state(trainer, host),
            data_state={"pos": step},
            meta=META,
            step_finite=m["finite"],
        )
    ckpt.close()
    # keep=2 newest (6, 7) plus every multiple of keep_every=3 (3, 6)
    reader = checkpointer.Checkpointer(str(tmp_path / "ck"), read_only=True)
    assert reader.steps() == [3, 6, 7]
    target = checkpointer.abstract_state(trainer.init_fn, trainer.state_shardings)
    restored, data_state = reader.restore(6, target)
    _assert_trees_equal(restored, states[5])
    assert data_state == {"pos": 6, "step": 6}
    assert reader.read_json(6, "meta")["note"] == "test"
    assert restored.params["embed"].sharding == trainer.state_shardings.params["embed"]


def test_export_load_params_and_init_from(tmp_path, trained):
    trainer, states, _ = trained
    _save_run(tmp_path / "run", trainer, states, [5, 7])
    config, params, _ = listing.load_params(str(tmp_path / "run"))
    assert config == TINY_RUN
    _assert_trees_equal(params, states[6].params)
    _assert_split_over_local_devices(params, TINY_RUN.model)
    listing.export_params(str(tmp_path / "run"), 5, str(tmp_path / "out"))

    model_cfg, exported = params_dir.load(str(tmp_path / "out"))
    assert model_cfg == TINY_RUN.model
    _assert_trees_equal(exported, states[4].params)
    _assert_split_over_local_devices(exported, TINY_RUN.model)
    # --init-from: those params, a fresh optimizer and step 0
    decision = resume.decide_resume(
        str(tmp_path / "new"), TINY_RUN, init_from=str(tmp_path / "out")
    )
    state, data_state, source = decision.load(
        trainer.init_fn, trainer.state_shardings, str(tmp_path / "new"), TINY_RUN.model
    )
    _assert_trees_equal(state.params, states[4].params)
    for x, want in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(trainer.state_shardings.params)
    ):
        assert x.sharding.is_equivalent_to(want, x.ndim)  # restored onto training's layout
    assert int(state.step) == 0 and data_state is None and "params from" in source
    fresh = trainer.init_fn()
    _assert_trees_equal(state.opt_state, fresh.opt_state)
    decision.check_tokenizer(None)  # the run that wrote it had no tokenizer (synthetic data)
    with pytest.raises(
        compat.ResumeError, match="trained with tokenizer None, this run loads tokenizer abc"
    ):
        decision.check_tokenizer("abc")
    os.remove(tmp_path / "out" / compat.TOKENIZER_RECORD)  # an HF import: a warning only
    decision.check_tokenizer("abc")
    bigger = dataclasses.replace(TINY_RUN, model=dataclasses.replace(TINY_RUN.model, d_mlp=128))
    with pytest.raises(compat.ResumeError, match="model.d_mlp"):  # refused before any load
        resume.decide_resume(str(tmp_path / "new2"), bigger, init_from=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="is not an lmjax params directory"):
        resume.decide_resume(str(tmp_path / "new3"), TINY_RUN, init_from=str(tmp_path / "missing"))
