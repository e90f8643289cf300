"""The mixture-of-experts MLP against a float64 numpy loop over tokens and their experts
(tests/numpy_moe.py), forward and gradients, for every router, with and without the shared
expert, dropless and with capacity; `take_rows` and the dropless program's primitives; the
layer pattern, config checks, active FLOPs, and a short MoE fit that resumes from its
checkpoint."""

import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import MOE_ROUTERS, Config, ConfigError, ModelConfig, OptimConfig
from lmjax.config_checks import validate
from lmjax.model import flops, moe, objective, transformer
from tests import numpy_moe
from tests.configs import TINY_MOE

TOKENS = 12


def _layer(cfg: ModelConfig, seed: int = 0):
    """Random params of one MoE layer (scaled so that experts and router matter) and x."""
    rng = np.random.default_rng(seed)
    specs = transformer.param_specs(cfg)["moe"]
    p = {k: jnp.asarray(0.5 * rng.normal(size=s.shape[1:]), jnp.float32) for k, s in specs.items()}
    return p, jnp.asarray(rng.normal(size=(TOKENS, cfg.d_model)), jnp.float32)


def _reference(cfg: ModelConfig, p, x):
    cap = moe.capacity(TOKENS, cfg) if cfg.moe_capacity_factor > 0 else None
    host = {k: np.asarray(v, np.float64) for k, v in p.items()}
    return numpy_moe.moe_mlp(
        np.asarray(x, np.float64),
        host,
        top_k=cfg.moe_top_k,
        router=cfg.moe_router,
        capacity=cap,
        scale=cfg.moe_routed_scale,
    )


def _directional_derivative(cfg, p, x, direction, cotangent, eps=1e-5):
    """Central difference of sum(reference(p, x) * cotangent) along (dp, dx), float64."""
    dp, dx = direction

    def at(sign):
        q = {k: np.asarray(v, np.float64) + sign * eps * dp[k] for k, v in p.items()}
        y = _reference(cfg, q, np.asarray(x, np.float64) + sign * eps * dx)[0]
        return np.sum(y * cotangent)

    return (at(1) - at(-1)) / (2 * eps)


# Every router with and without the shared expert eagerly; the richest case (biased sigmoid
# router, scale, shared expert) jitted too (a compile per capacity factor, so only one).
MOE_CASES = [
    *[(router, shared, "eager") for router in MOE_ROUTERS for shared in (0, 5)],
    ("sigmoid_topk_bias", 5, "jit"),
]


@pytest.mark.parametrize("router,shared,maybe_jit", MOE_CASES, indirect=["maybe_jit"])
def test_moe_mlp_equals_a_numpy_loop_forward_and_gradients(router, shared, maybe_jit):
    """Dropless, capacity with room for all (factor 2: nothing dropped) and tight capacity
    (factor 0.5: the over-capacity copies dropped, exactly those of the reference). The
    sigmoid router runs with a random bias (that changes some token's choice) and a scale."""
    scale = 2.5 if router == "sigmoid_topk_bias" else 1.0
    base = dataclasses.replace(
        TINY_MOE, moe_router=router, moe_shared_d_mlp=shared, moe_routed_scale=scale
    )
    p, x = _layer(base)
    if router == "sigmoid_topk_bias":
        unbiased = {**p, "router_bias": 0 * p["router_bias"]}
        assert not np.array_equal(
            moe.route(x, p, base).experts, moe.route(x, unbiased, base).experts
        )
    rng = np.random.default_rng(0)
    cotangent = rng.normal(size=(TOKENS, base.d_model))
    direction = {k: rng.normal(size=v.shape) for k, v in p.items()}
    dx = rng.normal(size=x.shape)
    for factor, drops in ((0.0, False), (2.0, False), (0.5, True)):
        cfg = dataclasses.replace(base, moe_capacity_factor=factor)
        want, want_dropped = _reference(cfg, p, x)
        assert (want_dropped > 0) == drops

        def objective(p, x, cfg=cfg):
            y, stats = moe.moe_mlp(x[None], p, cfg)
            return jnp.sum(y[0] * cotangent), (y[0], stats)

        (_, (y, stats)), (grads, grad_x) = maybe_jit(
            jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
        )(p, x)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
        assert float(stats["dropped"]) == want_dropped
        assert float(np.sum(stats["counts"])) == TOKENS * base.moe_top_k
        analytic = sum(np.vdot(grads[k], direction[k]) for k in p) + np.vdot(grad_x, dx)
        numeric = _directional_derivative(cfg, p, x, (direction, dx), cotangent)
        assert analytic == pytest.approx(numeric, rel=1e-4), (router, shared, factor)


def test_take_rows_gathers_and_its_gradient_equals_the_gathers():
    """`moe.take_rows` against indexing and jax's own gradient of it (a scatter-add), for a
    permutation (one copy of each row) and for 3 copies of each row in a shuffled order."""
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    for copies in (1, 3):
        to_host = rng.permutation(np.tile(np.arange(5), copies))
        # back[j x 5 + r]: the output row holding the j-th copy of row r
        where = [np.flatnonzero(to_host == r) for r in range(5)]
        to = jnp.asarray(to_host, jnp.int32)
        back = jnp.asarray(np.stack(where).T.reshape(-1), jnp.int32)
        g = jnp.asarray(rng.normal(size=(5 * copies, 3)), jnp.float32)
        got, vjp = jax.vjp(lambda r, to=to, back=back: moe.take_rows(r, to, back), rows)
        want, want_vjp = jax.vjp(lambda r, to=to: r[to], rows)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(vjp(g)[0], want_vjp(g)[0], rtol=1e-6, atol=1e-6)


def _primitives(jaxpr) -> list:
    """Every equation of `jaxpr` and of the jaxprs nested in it (scans, custom VJPs, jits)."""
    eqns = []
    for eqn in jaxpr.eqns:
        eqns.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                    eqns += _primitives(getattr(sub, "jaxpr", sub))
    return eqns


def test_dropless_dispatch_does_not_sort_and_its_gradient_scatter_adds_no_rows():
    """The dropless block's forward and backward hold no sort and no scatter-add of rows
    (jax's gradient of a gather): the copies are ordered by a cumsum and gathered by
    `take_rows`, whose TPU program compiles faster (README). The one scatter of rows is the
    unsort; the other scatters are of int32 indices."""
    p, x = _layer(TINY_MOE)
    loss = lambda p, x: jnp.sum(moe.moe_mlp(x[None], p, TINY_MOE)[0])
    eqns = _primitives(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(p, x).jaxpr)
    assert not [e for e in eqns if "sort" in e.primitive.name]
    rows = [e for e in eqns if "scatter" in e.primitive.name and e.invars[0].aval.ndim > 1]
    assert [(e.primitive.name, str(e.invars[0].aval.dtype)) for e in rows] == [
        ("scatter", "float32")
    ]


@pytest.mark.parametrize("router", ["softmax_topk_renorm", "sigmoid_topk_bias"])
def test_balance_and_router_z_losses_follow_their_definitions(router):
    """The balance loss scores each token's full distribution: the softmax, or the sigmoid
    scores normalized over the experts (DeepSeek-V3)."""
    cfg = dataclasses.replace(TINY_MOE, moe_router=router)
    p, x = _layer(cfg)
    r = moe.route(x, p, cfg)
    logits = np.asarray(r.logits, np.float64)
    if router == "sigmoid_topk_bias":
        probs = 1 / (1 + np.exp(-logits))
        probs /= probs.sum(-1, keepdims=True)
    else:
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    chosen = np.asarray(r.experts)
    frac = np.array([(chosen == e).sum() for e in range(4)]) / TOKENS
    assert float(moe.balance_loss(r, 4)) == pytest.approx(
        4 * np.sum(frac * probs.mean(0)), rel=1e-5
    )
    lse = np.log(np.exp(logits).sum(-1))
    assert float(moe.router_z_loss(r.logits)) == pytest.approx(np.mean(lse**2), rel=1e-5)
    even = jnp.asarray(np.arange(24).reshape(12, 2) % 4)
    uniform = moe.Routing(r.weights, even, 0 * r.logits, jnp.full_like(r.probs, 0.25))
    assert float(moe.balance_loss(uniform, 4)) == pytest.approx(2.0)  # top_k when balanced


def test_router_bias_moves_by_the_sign_rule_of_the_numpy_reference():
    """Counts from the numpy router's choices (over, under and exactly at the experts' mean)
    move the bias as tests/numpy_moe.py says, elementwise over stacked layers."""
    cfg = dataclasses.replace(TINY_MOE, moe_router="sigmoid_topk_bias", moe_experts=6)
    p, x = _layer(cfg)
    host = {k: np.asarray(v, np.float64) for k, v in p.items()}
    chosen, _ = numpy_moe.route(np.asarray(x, np.float64), host, top_k=2, router=cfg.moe_router)
    counts = np.bincount(chosen.ravel(), minlength=6)
    tied = np.array([4, 4, 0, 8, 2, 6])  # mean 4: experts 0 and 1 stay
    stacked = np.stack([counts, tied]).astype(np.float32)
    bias = np.stack([host["router_bias"], np.zeros(6)]).astype(np.float32)
    got = np.asarray(moe.bias_update(jnp.asarray(bias), jnp.asarray(stacked), 1e-3))
    for row in range(2):
        want = numpy_moe.bias_after_step(bias[row], stacked[row], 1e-3)
        np.testing.assert_allclose(got[row], want, rtol=0, atol=1e-7)
    assert np.count_nonzero(got[1] - bias[1]) == 4


def test_layer_pattern_param_table_and_scan_free_equivalence():
    cfg = dataclasses.replace(TINY_MOE, moe_first_dense_layers=1, moe_every=2)
    assert transformer.layer_is_moe(cfg) == (False, False, True, False)
    assert transformer.layer_runs(cfg) == [(False, 0, 2), (True, 2, 3), (False, 3, 4)]
    axes = transformer.param_axes(cfg)
    assert axes["moe"]["w_gate"] == ("layers", "expert", "embed", "mlp")
    assert axes["dense_mlp"]["w_down"] == ("layers", "mlp", "embed")
    assert "w_gate" not in axes["layers"]
    shapes = transformer.param_shapes(cfg)
    assert shapes["moe"]["w_up"].shape == (1, 4, 8, 6)
    assert shapes["dense_mlp"]["w_up"].shape == (3, 8, 12)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype), shapes)
    tokens = jnp.arange(16).reshape(2, 8)
    run = jax.jit(transformer.hidden_states_and_stats, static_argnums=2)
    x, stats = run(params, tokens, cfg)
    x2, stats2 = run(params, tokens, dataclasses.replace(cfg, scan_layers=False))
    np.testing.assert_allclose(x, x2, rtol=1e-5, atol=1e-6)
    assert stats["counts"].shape == (1, 4)
    np.testing.assert_array_equal(stats["counts"], stats2["counts"])


def test_active_params_and_flops_count_top_k_experts():
    cfg = dataclasses.replace(TINY_MOE, moe_shared_d_mlp=5, moe_first_dense_layers=1)
    total = transformer.count_params(cfg, include_embed=False)
    active = transformer.count_params(cfg, include_embed=False, active=True)
    experts = 3 * 3 * 4 * 8 * 6  # 3 MoE layers x 3 matrices x 4 experts x embed x moe_mlp
    assert total - active == experts // 2  # 2 of 4 experts active
    dense_twin = dataclasses.replace(cfg, moe_experts=0)
    attention = flops.flops_per_token(dense_twin, 16) - 6 * transformer.count_params(
        dense_twin, include_embed=False
    )
    assert flops.flops_per_token(cfg, 16) == pytest.approx(6 * active + attention)


def test_moe_config_errors_name_the_fix():
    def bad(**kw):
        with pytest.raises(ConfigError) as e:
            validate(Config(model=dataclasses.replace(TINY_MOE, **kw)))
        return str(e.value)

    assert "moe_top_k=5 must lie in [1, model.moe_experts=4]" in bad(moe_top_k=5)
    assert "choose one of" in bad(moe_router="sigmoid")
    assert "leave no MoE layer" in bad(moe_first_dense_layers=4)
    assert "moe_capacity_factor=-1.0" in bad(moe_capacity_factor=-1.0)
    assert "moe_every=0" in bad(moe_every=0)
    assert "moe_routed_scale=0.0 must be positive" in bad(moe_routed_scale=0.0)
    sigmoid = dataclasses.replace(TINY_MOE, moe_router="sigmoid_topk_bias")
    for model, fix in ((TINY_MOE, "set that router"), (sigmoid, "model.param_dtype=float32")):
        model = dataclasses.replace(model, param_dtype="bfloat16") if model is sigmoid else model
        with pytest.raises(ConfigError, match=fix):
            validate(Config(model=model, optim=OptimConfig(moe_bias_rate=1e-3)))


def test_step_balance_weights_make_microbatches_add_up_to_the_big_batch():
    """Two microbatches' balance sums under `step_balance_weights` (from their summed counts)
    give the big batch's balance loss times the step's tokens, value and router gradient;
    the unweighted per-microbatch sums (the default) give another value and gradient."""
    p, x = _layer(TINY_MOE)
    tokens = 11.0  # the step's loss tokens

    def big(p):
        return tokens * moe.balance_loss(moe.route(x, p, TINY_MOE), TINY_MOE.moe_experts)

    def micro_stats(p):
        stacked = lambda s: jax.tree.map(lambda a: jnp.asarray(a)[None], s)  # one MoE layer
        return [stacked(moe.moe_mlp(xm[None], p, TINY_MOE)[1]) for xm in (x[:5], x[5:])]

    def over_step(p):
        stats = micro_stats(p)
        w = objective.step_balance_weights(sum(s["counts"] for s in stats), tokens, 2)
        return sum(objective.moe_aux(s, 0.0, w)["moe_balance_sum"] for s in stats)

    def per_micro(p):  # each microbatch's loss times its share of the tokens
        stats = micro_stats(p)
        return sum(
            objective.moe_aux(s, tokens * n / 12)["moe_balance_sum"] for s, n in zip(stats, (5, 7))
        )

    (want, want_grad), (got, got_grad), (micro, micro_grad) = (
        jax.jit(jax.value_and_grad(f))(p) for f in (big, over_step, per_micro)
    )
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    np.testing.assert_allclose(got_grad["router"], want_grad["router"], rtol=1e-5, atol=1e-7)
    assert abs(float(micro) - float(want)) > 1e-3
    assert np.abs(micro_grad["router"] - want_grad["router"]).max() > 1e-3
