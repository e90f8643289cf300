"""The mixture-of-experts MLP against a float64 numpy loop over tokens and their experts
(tests/numpy_moe.py), forward and gradients, for every router, with and without the shared
expert, dropless and with capacity; the layer pattern, config checks, active FLOPs, and a
short MoE fit that resumes from its checkpoint."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.checkpoint import checkpointer, params_dir
from lmjax.config import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
)
from lmjax.data.pipeline import synthetic_batch
from lmjax.inference import generate
from lmjax.model import transformer
from lmjax.parallel import host_rows, sharding
from lmjax.train import loop, trainer as trainer_lib
from tests import numpy_moe
from tests.configs import TINY_MOE
from tests.unit import test_generate as generate_tests


def _random_params(cfg: ModelConfig, seed: int = 0):
    """Params drawn by numpy after the parameter table's initializers (jitting the model's
    init costs seconds on a CPU)."""
    rng = np.random.default_rng(seed)

    def draw(spec):
        if spec.init in ("ones", "zeros"):
            return np.full(spec.shape, 1.0 if spec.init == "ones" else 0.0, np.float32)
        return (cfg.init_std * rng.normal(size=spec.shape)).astype(np.float32)

    specs = transformer.param_specs(cfg)
    return jax.tree.map(draw, specs, is_leaf=lambda x: isinstance(x, transformer.ParamSpec))


def _fresh_state(tr, seed: int = 0):
    """A train state as `tr.init_fn` lays it out: `_random_params`, moments and counts zero,
    on `tr`'s shardings."""
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(tr.init_fn))
    state = zeros.replace(
        params=_random_params(tr.config.model, seed), rng=np.asarray(jax.random.PRNGKey(seed))
    )
    return jax.device_put(state, tr.state_shardings)


def test_kv_cache_generation_of_a_dense_and_moe_layered_model_matches_full_forward():
    """Prefill and one-token decoding through runs of dense and MoE layers (the cache split
    by run) give the full forward's logits."""
    cfg = dataclasses.replace(
        generate_tests.CFG,
        n_layers=4,
        moe_experts=4,
        moe_top_k=2,
        moe_first_dense_layers=1,
        moe_every=2,
    )
    assert transformer.layer_runs(cfg)[0][0] is False and len(transformer.layer_runs(cfg)) > 1
    params = jax.tree.map(lambda a: jnp.asarray(a * 10), _random_params(cfg, seed=3))
    generate_tests.check_cached_steps(params, cfg)


def test_moe_generation_on_the_offline_mesh_takes_any_batch_and_matches_one_device():
    """3 prompts on the 8-device offline mesh (rows that do not split over the devices) give
    one device's greedy tokens; with an expert axis such a batch is refused naming the fix."""
    params = jax.tree.map(lambda a: jnp.asarray(a * 10), _random_params(TINY_MOE, seed=5))
    prompts = np.random.default_rng(0).integers(0, TINY_MOE.vocab_size, (3, 5))
    alone = generate.generate(params, TINY_MOE, prompts, max_new_tokens=4)
    placed = jax.device_put(
        params, jax.tree.map(lambda t: t.sharding, params_dir.offline_target(TINY_MOE))
    )
    with sharding.activation_sharding(*sharding.offline_mesh(MeshConfig())):
        np.testing.assert_array_equal(
            generate.generate(placed, TINY_MOE, prompts, max_new_tokens=4), alone
        )
    expert = MeshConfig(fsdp=4, expert=2)
    with sharding.activation_sharding(
        sharding.make_mesh(expert), sharding.rules_from_config(expert)
    ):
        with pytest.raises(ConfigError, match="divisible by the data x fsdp x expert"):
            generate.generate(params, TINY_MOE, prompts, max_new_tokens=4)


MOE_RUN = Config(
    model=TINY_MOE,
    mesh=MeshConfig(fsdp=1),
    data=DataConfig(source="synthetic", batch_size=4, seq_len=16),
    optim=OptimConfig(lr=1e-2, warmup_steps=0, moe_aux_loss=0.01, moe_router_z_loss=1e-3),
    checkpoint=CheckpointConfig(async_save=False),
    run=RunConfig(steps=40),
)


# The sigmoid router with its bias moving, over 2 microbatches: the learning test also checks
# the bias rule on the whole step's counts and that the bias resumes.
BIAS_RUN = dataclasses.replace(
    MOE_RUN,
    model=dataclasses.replace(TINY_MOE, moe_router="sigmoid_topk_bias", moe_routed_scale=2.0),
    optim=dataclasses.replace(MOE_RUN.optim, moe_bias_rate=1e-3, grad_accum=2),
)


@functools.partial(jax.jit, static_argnums=2)
def _stats(params, batch, cfg: ModelConfig):
    return transformer.hidden_states_and_stats(
        params, batch["inputs"], cfg, segment_ids=batch["segment_ids"], positions=batch["positions"]
    )[1]


def _forward_stats(params, batch, cfg: ModelConfig):
    """The MoE stats [moe layers, ...] of one forward over `batch` (numpy)."""
    return jax.tree.map(np.asarray, _stats(params, batch, cfg))


def _check_balance_metrics(params, batch, logged, cfg: ModelConfig):
    """With 2 microbatches (rows m, m + 2, ...) the objective's moe_balance is the token-weighted
    mean of the microbatches' balance losses, and moe_balance_batch the whole batch's; here
    they differ."""
    whole = np.mean(_forward_stats(params, batch, cfg)["balance"])
    parts, tokens = [], []
    for m in range(2):
        micro = jax.tree.map(lambda a, m=m: a[m::2], batch)
        parts.append(np.mean(_forward_stats(params, micro, cfg)["balance"]))
        tokens.append(np.sum(np.asarray(micro["loss_mask"])))
    assert logged["moe_balance"] == pytest.approx(np.average(parts, weights=tokens), rel=1e-5)
    assert logged["moe_balance_batch"] == pytest.approx(whole, rel=1e-5)
    assert abs(whole - logged["moe_balance"]) > 1e-4


def test_a_tiny_moe_learns_moves_its_router_bias_and_resumes_bitwise(tmp_path):
    """Sigmoid router, bias rate 1e-3, 2 microbatches: the loss falls, the bias after a step
    is the numpy rule on that step's counts over both microbatches, the optimizer never moves
    it (its moments stay 0), the balance metrics are the microbatches' and the batch's, and a
    checkpoint restores the bias and resumes bitwise."""
    tr = trainer_lib.make_trainer(BIAS_RUN, sharding.make_mesh(BIAS_RUN.mesh, jax.devices()[:1]))
    batch = synthetic_batch(0, 0, 0, range(4), 16, TINY_MOE.vocab_size)
    batch = host_rows.global_batch(batch, tr.batch_sharding)
    state = _fresh_state(tr)
    losses = []
    for step in range(20):
        bias = np.asarray(state.params["moe"]["router_bias"])
        checked = step in (0, 19)
        if checked:
            before = jax.tree.map(np.asarray, state.params)
            counts = _forward_stats(before, batch, BIAS_RUN.model)["counts"]
        state, m = tr.step_fn(state, batch)
        losses.append(loop.fetch(m)["loss"])
        if checked:
            _check_balance_metrics(before, batch, loop.fetch(m), BIAS_RUN.model)
            got = np.asarray(state.params["moe"]["router_bias"])
            for row in range(len(counts)):
                want = numpy_moe.bias_after_step(bias[row], counts[row], 1e-3)
                np.testing.assert_allclose(got[row], want, rtol=0, atol=1e-6)
    assert losses[-1] < 0.75 * losses[0]
    assert np.abs(np.asarray(state.params["moe"]["router_bias"])).max() > 5e-3
    moments = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if "router_bias" in jax.tree_util.keystr(path)
    ]
    assert moments and all(not np.any(np.asarray(a)) for a in moments)
    logged = loop.fetch(m)
    assert 1.0 <= logged["moe_load_max/0"] <= 4.0 and logged["moe_balance"] > 0
    ckpt = checkpointer.Checkpointer(str(tmp_path / "ck"), BIAS_RUN.checkpoint)
    ckpt.save(20, state, data_state={}, meta={})
    ckpt.close()
    target = checkpointer.abstract_state(tr.init_fn, tr.state_shardings)
    restored, _ = checkpointer.Checkpointer(str(tmp_path / "ck"), read_only=True).restore(
        20, target
    )
    np.testing.assert_array_equal(
        restored.params["moe"]["router_bias"], state.params["moe"]["router_bias"]
    )
    after, _ = tr.step_fn(state, batch)
    resumed, _ = tr.step_fn(restored, batch)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_expert_parallel_mesh_trains_with_the_losses_of_one_device(tmp_path):
    """expert x fsdp (2 x 4) on 8 devices, 2 microbatches with the balance loss over the
    step: tokens cross expert shards by all-to-all (dropless), and two steps give one
    device's (1 microbatch) losses and balance losses (the second after an update computed
    from expert-parallel gradients). Its checkpoint after the first step restores bitwise onto
    one device (expert 1) and gives there the second step's loss. (expert x tensor runs across
    two processes in tests/integration/test_multihost.py.)"""
    model = dataclasses.replace(TINY_MOE, n_kv_heads=2, n_layers=2)
    base = dataclasses.replace(MOE_RUN, model=model, data=DataConfig(batch_size=16, seq_len=16))
    host_batch = synthetic_batch(0, 0, 0, range(16), 16, TINY_MOE.vocab_size)

    def trainer(mesh_cfg, devices, **optim):
        cfg = dataclasses.replace(
            base, mesh=mesh_cfg, optim=dataclasses.replace(base.optim, **optim)
        )
        return trainer_lib.make_trainer(cfg, sharding.make_mesh(mesh_cfg, jax.devices()[:devices]))

    def step(tr, state):
        state, m = tr.step_fn(state, host_rows.global_batch(host_batch, tr.batch_sharding))
        return state, loop.fetch(m)

    one = trainer(MeshConfig(fsdp=1), 1)
    ep = trainer(MeshConfig(expert=2, fsdp=4), 8, grad_accum=2, moe_balance_over_step=True)
    assert ep.state_shardings.params["moe"]["w_gate"].spec[1] == "expert"
    state, first = step(one, _fresh_state(one))
    _, second = step(one, state)
    state, ep_first = step(ep, _fresh_state(ep))
    saved = jax.tree.map(np.asarray, state)
    ckpt = checkpointer.Checkpointer(str(tmp_path / "ck"), base.checkpoint)
    ckpt.save(1, state, data_state={}, meta={})
    ckpt.close()
    _, ep_second = step(ep, state)
    for name in ("loss", "moe_balance"):
        want = [first[name], second[name]]
        np.testing.assert_allclose([ep_first[name], ep_second[name]], want, rtol=1e-5)
    target = checkpointer.abstract_state(one.init_fn, one.state_shardings)
    restored, _ = checkpointer.Checkpointer(str(tmp_path / "ck"), read_only=True).restore(1, target)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), b)
    _, after_restore = step(one, restored)
    np.testing.assert_allclose(after_restore["loss"], ep_second["loss"], rtol=1e-5)
