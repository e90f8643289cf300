"""The train step: gradient accumulation, loss normalization, optimizer, a short fit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax.config import Config, ConfigError, OptimConfig
from lmjax.train import optim, run, trainer
from tests.configs import TINY_RUN


def test_microbatch_m_takes_every_nth_row():
    x = jnp.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(trainer.microbatches(x, 3)[1], [[2, 3], [8, 9]])


def test_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    s = optim.learning_rate_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
    assert float(s(10)) == pytest.approx(1.0) and float(s(110)) == pytest.approx(0.1)
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)
    wsd = optim.learning_rate_schedule(
        dataclasses.replace(cfg, schedule="wsd", wsd_decay_fraction=0.2), 110
    )
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(88)) == pytest.approx(1.0)
    assert float(wsd(99)) == pytest.approx(1.0 - 0.9 * 11 / 22, rel=1e-5)
    assert float(wsd(110)) == pytest.approx(0.1)


def test_adamw_update_matches_a_numpy_reference_over_several_steps():
    """make_optimizer over 3 steps == AdamW written out in numpy: global-norm clipping (active:
    every gradient's norm exceeds clip_norm), bias-corrected moments, decoupled decay on
    matrices only, and the warmup learning rate of each step (0, lr/2, lr)."""
    cfg = OptimConfig(
        lr=0.1,
        warmup_steps=2,
        schedule="constant",
        clip_norm=0.5,
        weight_decay=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
    )
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 3)), "norm": rng.normal(size=3)}
    tx = optim.make_optimizer(cfg, 10)
    state, got = tx.init(jax.tree.map(jnp.float32, params)), jax.tree.map(jnp.float32, params)
    want = {k: v.copy() for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    nu = {k: np.zeros_like(v) for k, v in params.items()}
    for t, lr in enumerate([0.0, 0.05, 0.1], start=1):
        grads = {k: rng.normal(size=v.shape) * 3 for k, v in params.items()}
        norm = np.sqrt(sum((g**2).sum() for g in grads.values()))
        assert norm > cfg.clip_norm
        for k, g in grads.items():
            g = g * cfg.clip_norm / norm
            mu[k] = cfg.b1 * mu[k] + (1 - cfg.b1) * g
            nu[k] = cfg.b2 * nu[k] + (1 - cfg.b2) * g * g
            step = (mu[k] / (1 - cfg.b1**t)) / (np.sqrt(nu[k] / (1 - cfg.b2**t)) + cfg.eps)
            decay = cfg.weight_decay * want[k] if k == "w" else 0.0
            want[k] = want[k] - lr * (step + decay)
        updates, state = tx.update(jax.tree.map(jnp.float32, grads), state, got)
        got = optax.apply_updates(got, updates)
        for k in params:
            np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=1e-6)
    assert not np.allclose(want["w"], params["w"])


def test_eta_after_a_resume_counts_this_process_steps(tmp_path, capsys):
    from lmjax.observe import metrics

    writer = metrics.MetricsWriter(str(tmp_path), 100, start_step=90)
    writer.start -= 10.0  # 10 s in this process, 5 steps done since step 90, 5 to go
    writer.write(95, {"loss": 1.0})
    writer.close()
    eta = float(capsys.readouterr().out.split("eta=")[1].rstrip("s\n"))
    assert eta == pytest.approx(10.0, abs=0.5)  # counting from step 0 would give 0.5 s


def _accumulating(batch_size: int, grad_accum: int) -> Config:
    """TINY_RUN (8 devices, all fsdp: 8 batch devices) with `grad_accum` microbatches."""
    return dataclasses.replace(
        TINY_RUN,
        data=dataclasses.replace(TINY_RUN.data, batch_size=batch_size),
        optim=dataclasses.replace(TINY_RUN.optim, grad_accum=grad_accum),
    )


class _Reached(Exception):
    pass


def test_microbatches_the_batch_devices_cannot_split_are_refused_first(tmp_path, monkeypatch):
    """16 rows in 4 microbatches of 4 on 8 batch devices: refused in the set-up before the
    resume decision (and so before the tokenizer, the stores and any compile); 16 rows in 2
    microbatches of 8 pass on to it."""

    def decide_resume(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(run.resume_lib, "decide_resume", decide_resume)
    with pytest.raises(ConfigError, match=r"16 / 4 = 4 rows .* a multiple of 8$"):
        run.train(_accumulating(16, 4), str(tmp_path / "refused"))
    with pytest.raises(_Reached):
        run.train(_accumulating(16, 2), str(tmp_path / "passes"))
