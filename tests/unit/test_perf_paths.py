"""The fused cross-entropy (lmjax/model/cross_entropy.py) against a numpy reference and against autodiff.

float32 throughout; the hand-written VJP must give the gradients autodiff gives through
explicit logits, for every chunking, with a loss mask and a z-loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.model import cross_entropy

B, S, D, V = 2, 16, 8, 64


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, S, D)).astype(np.float32)
    w = rng.standard_normal((D, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, S)).astype(np.int32)
    weights = (rng.random((B, S)) > 0.2).astype(np.float32)
    return x, w, targets, weights


def _numpy_sums(x, w, targets, weights, z_loss):
    logits = x.astype(np.float64) @ w.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    target = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    nll = np.sum((logz - target) * weights)
    z = np.sum(logz**2 * weights)
    return nll + z_loss * z, nll, z


def _autodiff_objective(x, w, targets, weights, z_loss):
    logits = jnp.einsum("bsd,dv->bsv", x, w)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - target) * weights) + z_loss * jnp.sum(logz**2 * weights)


# Every chunking and backward matmul jitted, with and without the z-loss; the chunked scan
# with the row-major backward eager too (the scan a Python loop over the chunks).
CASES = [
    *[
        (c, i, z, "jit")
        for c, i in ((0, "xla"), (4, "xla"), (16, "xla"), (4, "row_major"))
        for z in (0.0, 1e-2)
    ],
    (4, "row_major", 1e-2, "eager"),
]


@pytest.mark.parametrize("chunk,impl,z_loss,maybe_jit", CASES, indirect=["maybe_jit"])
def test_fused_loss_values_and_gradients_match_references(chunk, impl, z_loss, maybe_jit):
    x, w, targets, weights = _inputs()
    sums = maybe_jit(lambda *a: cross_entropy.loss_sums(*a, z_loss=z_loss, chunk=chunk, impl=impl))(
        x, w, targets, weights
    )
    for got, want in zip(sums, _numpy_sums(x, w, targets, weights, z_loss)):
        np.testing.assert_allclose(float(got), want, rtol=1e-5)

    fused_grad = maybe_jit(
        jax.grad(
            lambda x, w: (
                3.0
                * cross_entropy.loss_sums(
                    x, w, targets, weights, z_loss=z_loss, chunk=chunk, impl=impl
                )[0]
            ),
            argnums=(0, 1),
        )
    )(x, w)
    ref_grad = jax.grad(
        lambda x, w: 3.0 * _autodiff_objective(x, w, targets, weights, z_loss), argnums=(0, 1)
    )(x, w)
    for got, want in zip(fused_grad, ref_grad):
        # float32: softmax as exp(logits - logsumexp) vs autodiff's form, values up to ~10
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_masked_tokens_get_no_gradient_and_reported_sums_carry_none():
    x, w, targets, weights = _inputs(1)
    weights[0, 3] = 0.0
    gx = jax.grad(lambda x: cross_entropy.loss_sums(x, w, targets, weights, chunk=4)[0])(x)
    assert np.all(np.asarray(gx)[0, 3] == 0.0) and np.any(np.asarray(gx)[0, 2] != 0.0)
    g_reported = jax.grad(lambda x: cross_entropy.loss_sums(x, w, targets, weights, z_loss=0.1)[1])(
        x
    )
    assert not np.any(np.asarray(g_reported))


def test_bfloat16_inputs_stay_close_to_float32():
    x, w, targets, weights = _inputs(2)
    f32 = cross_entropy.loss_sums(x, w, targets, weights)[0]
    bf16 = cross_entropy.loss_sums(jnp.asarray(x, jnp.bfloat16), w, targets, weights)[0]
    np.testing.assert_allclose(float(bf16), float(f32), rtol=2e-2)
    gx = jax.grad(lambda x: cross_entropy.loss_sums(x, w, targets, weights)[0])(
        jnp.asarray(x, jnp.bfloat16)
    )
    assert gx.dtype == jnp.bfloat16


def test_chunk_must_divide_the_sequence():
    x, w, targets, weights = _inputs()
    with pytest.raises(ValueError, match="loss chunk 5 must divide the sequence length 16"):
        cross_entropy.loss_sums(x, w, targets, weights, chunk=5)
