"""The dropless grouped matmul (`moe.grouped_matmul`): the megablox Pallas TPU kernel, run here
in Pallas interpret mode on the CPU, equals `jax.lax.ragged_dot` and a float64 numpy loop
over the groups, forward and gradients with respect to the rows and the group matrices
(empty and uneven groups, one crossing a row block); the MoE block through it equals the numpy
MoE loop (tests/numpy_moe.py); the tiling rule and the choice of kernel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import Config, ConfigError
from lmjax.config_checks import validate
from lmjax.model import moe
from tests.configs import TINY_MOE
from tests.unit.test_moe import _directional_derivative, _layer, _reference

# 600 rows: blocks of 512 (the rule's tm), so group 2 crosses the block boundary at row 512,
# the rows are padded to 1024, and groups 1 and 3 are empty.
SIZES = (250, 0, 300, 0, 49, 1)


def _numpy_grouped(lhs, w, sizes, cotangent):
    """float64 loop over the groups: (out, d lhs, d w) of sum(out * cotangent)."""
    out, d_lhs, d_w = np.zeros((lhs.shape[0], w.shape[2])), np.zeros_like(lhs), np.zeros_like(w)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        out[rows] = lhs[rows] @ w[g]
        d_lhs[rows] = cotangent[rows] @ w[g].T
        d_w[g] = lhs[rows].T @ cotangent[rows]
        start += size
    return out, d_lhs, d_w


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_megablox_equals_ragged_dot_and_numpy_forward_and_gradients(dtype, tol):
    rng = np.random.default_rng(0)
    m, k, n = sum(SIZES), 8, 6
    lhs, w = rng.normal(size=(m, k)), rng.normal(size=(len(SIZES), k, n))
    cotangent = rng.normal(size=(m, n))
    sizes = jnp.asarray(SIZES, jnp.int32)
    want = _numpy_grouped(lhs, w, SIZES, cotangent)

    def run(impl):
        def objective(a, b):
            out = moe.grouped_matmul(a, b, sizes, impl)
            return jnp.sum(out.astype(jnp.float32) * cotangent), out

        grads, out = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))(
            jnp.asarray(lhs, dtype), jnp.asarray(w, dtype)
        )
        return [np.asarray(a, np.float64) for a in (out, *grads)]

    got, ragged = run("megablox"), run("ragged_dot")
    scale = [np.abs(a).max() for a in want]
    for name, g, r, wa, s in zip(("out", "d_lhs", "d_w"), got, ragged, want, scale):
        np.testing.assert_allclose(g, wa, rtol=0, atol=tol * s, err_msg=name)
        np.testing.assert_allclose(g, r, rtol=0, atol=tol * s, err_msg=name)
    assert not np.any(got[2][[1, 3]])  # empty groups get a zero gradient


def test_moe_block_through_megablox_equals_the_numpy_loop():
    """Dropless MoE forward and a directional derivative of the numpy loop against jax.grad
    with respect to every parameter and the input."""
    cfg = dataclasses.replace(TINY_MOE, moe_matmul="megablox")
    p, x = _layer(cfg)
    rng = np.random.default_rng(1)
    cotangent = rng.normal(size=x.shape)
    direction = ({k: rng.normal(size=v.shape) for k, v in p.items()}, rng.normal(size=x.shape))

    def objective(p, x):
        y = moe.moe_mlp(x[None], p, cfg)[0][0]
        return jnp.sum(y * cotangent), y

    (grads, grad_x), y = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))(p, x)
    np.testing.assert_allclose(y, _reference(cfg, p, x)[0], rtol=1e-5, atol=1e-6)
    analytic = sum(np.vdot(grads[k], direction[0][k]) for k in p) + np.vdot(grad_x, direction[1])
    numeric = _directional_derivative(cfg, p, x, direction, cotangent)
    assert analytic == pytest.approx(numeric, rel=1e-4)


def test_tiling_rule_and_kernel_choice():
    # Mixtral 8x7B, 4096 tokens x 12 rows x top 2 per chip: MaxText's blocks.
    assert moe.megablox_tiling(98304, 4096, 14336, jnp.bfloat16) == (512, 1024, 1024)
    assert moe.megablox_tiling(98304, 14336, 4096, jnp.float32) == (512, 512, 512)
    # Small dimensions: their own size rounded up to the 128 lanes.
    assert moe.megablox_tiling(18, 8, 200, jnp.float32) == (128, 128, 256)
    assert moe.resolve_matmul("auto", "tpu") == "megablox"
    assert moe.resolve_matmul("auto", "gpu") == moe.resolve_matmul("auto", "cpu") == "ragged_dot"
    assert moe.resolve_matmul("ragged_dot", "tpu") == "ragged_dot"
    with pytest.raises(ConfigError, match="moe_matmul=megablox takes float32 or bfloat16"):
        validate(
            Config(model=dataclasses.replace(TINY_MOE, moe_matmul="megablox", dtype="float16"))
        )
    with pytest.raises(ConfigError, match="choose one of"):
        validate(Config(model=dataclasses.replace(TINY_MOE, moe_matmul="gmm")))
