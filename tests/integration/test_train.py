"""The train step: gradient accumulation, loss normalization, optimizer, a short fit."""

import dataclasses
import math
import re

import jax
import numpy as np
import optax
import pytest

from lmjax.config import Config, DataConfig, MeshConfig, OptimConfig, RunConfig
from lmjax.data.pipeline import synthetic_batch
from lmjax.model import transformer
from lmjax.model.objective import loss_terms
from lmjax.parallel import host_rows, sharding
from lmjax.train import loop, optim, trainer
from tests.configs import TINY_LM


def _config(**optim_kw) -> Config:
    return Config(
        model=TINY_LM,
        mesh=MeshConfig(fsdp=1),
        data=DataConfig(batch_size=8, seq_len=16),
        optim=OptimConfig(warmup_steps=0, lr=1e-2, **optim_kw),
        run=RunConfig(steps=50),
    )


def _trainer(config):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    return trainer.make_trainer(config, mesh)


def _batch(seed=0, padded=False):
    b = synthetic_batch(seed, 0, 0, range(8), 16, TINY_LM.vocab_size)
    if padded:  # rows with different numbers of real target tokens
        b["loss_mask"][np.arange(8) % 3 == 0, 10:] = 0.0
    return b


def test_grad_accumulation_equals_large_batch():
    batch = _batch(padded=True)
    results = []
    for accum in (1, 4):
        # A large Adam eps makes the update smooth in the gradient, so params compare tightly.
        tr = _trainer(_config(grad_accum=accum, eps=1.0))
        state = tr.init_fn()
        state, m = tr.step_fn(state, host_rows.global_batch(batch, tr.batch_sharding))
        results.append((state.params, loop.fetch(m)))
    (p1, m1), (p4, m4) = results
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p4)


def _loop_collectives(hlo: str) -> list[str]:
    """Collective ops (all-to-all, all-gather, collective-permute) in the bodies of the while
    loops of compiled HLO text and in every computation those bodies call."""
    comps, current = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = comps.setdefault(header.group(1), [])
        elif current is not None:
            current.append(line)
    calls = r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)"
    todo = [
        b for lines in comps.values() for l in lines for b in re.findall(r"body=%?([\w.\-]+)", l)
    ]
    seen = set(todo)
    while todo:
        for name in re.findall(calls, "\n".join(comps.get(todo.pop(), []))):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    ops = r" (all-to-all|all-gather|collective-permute)(-start)?\("
    return [l.strip() for name in seen for l in comps.get(name, []) if re.search(ops, l)]


def test_microbatches_stay_on_their_devices_and_sum_to_the_big_batch():
    """Gradient accumulation on 8 devices: each microbatch is spread over every batch shard
    (strided rows), so the accumulation loop moves no batch data between devices; the step
    equals the big batch."""
    batch = synthetic_batch(0, 0, 0, range(32), 16, TINY_LM.vocab_size)
    batch["loss_mask"][np.arange(32) % 3 == 0, 10:] = 0.0
    results = []
    for mesh, accum in (((1, 1, 1), 1), ((2, 2, 2), 4), ((8, 1, 1), 4)):
        config = dataclasses.replace(
            _config(grad_accum=accum, eps=1.0),
            mesh=MeshConfig(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]),
            data=DataConfig(batch_size=32, seq_len=16),
        )
        devices = jax.devices()[: math.prod(mesh)]
        tr = trainer.make_trainer(config, sharding.make_mesh(config.mesh, devices))
        state, global_batch = tr.init_fn(), host_rows.global_batch(batch, tr.batch_sharding)
        step = tr.step_fn.lower(state, global_batch).compile()
        if mesh == (8, 1, 1):  # replicated params: nothing in the loop needs another device
            assert _loop_collectives(step.as_text()) == []
        state, m = step(state, global_batch)
        results.append((jax.device_get(state.params), loop.fetch(m)))
    (p1, m1), *rest = results
    for p, m in rest:
        assert m["loss"] == pytest.approx(m1["loss"], rel=1e-6)
        assert m["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, p1)


def test_loss_is_mean_over_unmasked_targets():
    batch = _batch(padded=True)
    tr = _trainer(_config())
    state = tr.init_fn()
    logits = np.asarray(
        jax.jit(
            lambda p: transformer.forward(
                p,
                batch["inputs"],
                TINY_LM,
                segment_ids=batch["segment_ids"],
                positions=batch["positions"],
            )
        )(state.params),
        np.float64,
    )
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    expected = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    _, m = tr.step_fn(state, host_rows.global_batch(batch, tr.batch_sharding))
    assert loop.fetch(m)["loss"] == pytest.approx(expected, rel=1e-5)


def test_loss_decreases_on_a_fixed_batch():
    tr = _trainer(_config())
    state = tr.init_fn()
    batch = host_rows.global_batch(_batch(), tr.batch_sharding)
    losses = []
    for _ in range(30):
        state, m = tr.step_fn(state, batch)
        losses.append(loop.fetch(m)["loss"])
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30


def test_nonfinite_step_is_skipped_and_the_schedule_stays_in_step():
    """on_nonfinite=skip: params and moments stay, `step` and the optimizer's counts both
    advance, so the next step applies (and logs) schedule(step)."""
    cfg = _config()
    cfg = dataclasses.replace(
        cfg,
        optim=dataclasses.replace(cfg.optim, warmup_steps=4),
        checkpoint=dataclasses.replace(cfg.checkpoint, on_nonfinite="skip"),
    )
    tr = _trainer(cfg)
    state, _ = tr.step_fn(tr.init_fn(), host_rows.global_batch(_batch(1), tr.batch_sharding))
    before = jax.device_get(state)
    bad = _batch()
    bad["loss_mask"] = np.full_like(bad["loss_mask"], np.inf)
    state, m = tr.step_fn(state, host_rows.global_batch(bad, tr.batch_sharding))
    assert loop.fetch(m)["finite"] == 0.0
    after = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
    floats = lambda s: [x for x in jax.tree.leaves(s.opt_state) if x.dtype.kind == "f"]
    jax.tree.map(np.testing.assert_array_equal, floats(after), floats(before))
    counts = [int(x) for x in jax.tree.leaves(after.opt_state) if x.dtype.kind in "iu"]
    assert int(after.step) == 2 and counts == [2, 2]
    # the next good step applies schedule(2) = 0.5 lr, the learning rate it logs: with the
    # same moments and a count of 2, optax's own AdamW gives the same params
    state, m = tr.step_fn(state, host_rows.global_batch(_batch(3), tr.batch_sharding))
    assert loop.fetch(m)["learning_rate"] == pytest.approx(0.5 * cfg.optim.lr)
    grads = jax.grad(
        lambda p: loss_terms(p, host_rows.global_batch(_batch(3), tr.batch_sharding), TINY_LM, 0.0)[
            0
        ]
    )(after.params)
    tokens = float(np.sum(_batch(3)["loss_mask"]))
    grads = jax.tree.map(lambda g: g / tokens, grads)
    reference = optax.chain(
        optax.clip_by_global_norm(cfg.optim.clip_norm),
        optax.adamw(
            0.5 * cfg.optim.lr,
            b1=cfg.optim.b1,
            b2=cfg.optim.b2,
            eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay,
            mask=lambda p: optim.weight_decay_mask(p, cfg.optim),
        ),
    )
    # lmjax's state holds optax's leaves (Adam count, mu, nu) and then the schedule's count
    ref_state = jax.tree.unflatten(
        jax.tree.structure(reference.init(after.params)), jax.tree.leaves(after.opt_state)[:-1]
    )
    updates, _ = reference.update(grads, ref_state, after.params)
    expected = optax.apply_updates(after.params, updates)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        jax.device_get(state.params),
        expected,
    )
    assert int(state.step) == 3


def test_weight_decay_mask_spares_norms_and_embeddings():
    params = transformer.init(TINY_LM, jax.random.PRNGKey(0))
    mask = optim.weight_decay_mask(params, OptimConfig())
    assert mask["layers"]["wq"] and mask["layers"]["w_down"]
    assert not mask["layers"]["attn_norm"] and not mask["final_norm"]
    assert not mask["embed"] and not mask["unembed"]
    assert optim.weight_decay_mask(params, OptimConfig(decay_embeddings=True))["embed"]
    family = dataclasses.replace(TINY_LM, qkv_bias=True, qk_norm=True, post_norms=True)
    layers = optim.weight_decay_mask(transformer.param_shapes(family), OptimConfig())["layers"]
    spared = ("q_bias", "k_bias", "v_bias", "q_norm", "k_norm", "attn_post_norm", "mlp_post_norm")
    assert layers["wq"] and not any(layers[name] for name in spared)


def test_evaluate_reports_each_source_and_their_token_weighted_whole():
    tr = _trainer(_config())
    params = tr.init_fn().params
    sets = {"web": [_batch(0)], "books": [_batch(1, padded=True), _batch(2)]}
    alone = {n: trainer.evaluate_params(tr, params, {n: b}) for n, b in sets.items()}
    weights = {"web": 0.75, "books": 0.25}
    both = trainer.evaluate_params(tr, params, sets, weights)
    assert "eval_loss/web" not in alone["web"]  # one source: the overall figures only
    for n in sets:
        assert both[f"eval_loss/{n}"] == pytest.approx(alone[n]["eval_loss"], rel=1e-6)
        assert both[f"eval_tokens/{n}"] == alone[n]["eval_tokens"]
    tokens = {n: alone[n]["eval_tokens"] for n in sets}
    by_weight = 0.75 * alone["web"]["eval_loss"] + 0.25 * alone["books"]["eval_loss"]
    assert both["eval_loss_weighted"] == pytest.approx(by_weight, rel=1e-6)
    assert tokens["books"] < 2 * tokens["web"]  # the padded batch has fewer targets
    whole = sum(alone[n]["eval_loss"] * tokens[n] for n in sets) / sum(tokens.values())
    assert both["eval_loss"] == pytest.approx(whole, rel=1e-6)
    assert both["eval_tokens"] == sum(tokens.values())
