"""lmjax.model.matmul: projections with row-major backward matmuls, against numpy, and the property
they exist for: on XLA:CPU every matmul of a bfloat16 projection and its gradients stays in
bfloat16 (the transposed forms autodiff produces are converted to float32)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.model import matmul


@pytest.mark.parametrize("impl", ["xla", "row_major"])
@pytest.mark.parametrize("contract", [1, 2])
def test_dense_and_its_gradients_match_numpy(impl, contract):
    rng = np.random.default_rng(contract)
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    w = rng.standard_normal((4, 5, 6) if contract == 2 else (5, 6, 7)).astype(np.float32)
    y = matmul.dense(jnp.asarray(x), jnp.asarray(w), contract=contract, impl=impl)
    k = int(np.prod(w.shape[:contract]))
    x2, w2 = x.reshape(-1, k).astype(np.float64), w.reshape(k, -1).astype(np.float64)
    np.testing.assert_allclose(
        np.asarray(y).reshape(x2.shape[0], -1), x2 @ w2, rtol=1e-5, atol=1e-5
    )
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw = jax.grad(
        lambda x, w: jnp.sum(matmul.dense(x, w, contract=contract, impl=impl) * g), argnums=(0, 1)
    )(jnp.asarray(x), jnp.asarray(w))
    g2 = g.reshape(x2.shape[0], -1).astype(np.float64)
    np.testing.assert_allclose(np.asarray(dx).reshape(x2.shape), g2 @ w2.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw).reshape(w2.shape), x2.T @ g2, rtol=1e-5, atol=1e-5)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype


def test_row_major_gives_the_float32_parameter_a_float32_gradient_from_bfloat16_compute():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    dw = jax.grad(lambda w: jnp.sum(matmul.dense(x, w, impl="row_major").astype(jnp.float32)))(w)
    assert dw.dtype == jnp.float32
    want = np.asarray(x, np.float64).T @ np.ones((64, 16))  # bf16 inputs, exact f32 sums
    np.testing.assert_allclose(np.asarray(dw), want, rtol=1e-6)


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, ...]]:
    """The operand dtypes of every dot in compiled HLO text."""
    dtype_of = dict(re.findall(r"%?([\w.\-]+) = (\w+)\[", hlo))
    dtype_of.update(re.findall(r"([\w.\-]+): (\w+)\[", hlo))  # computation parameters
    return [
        tuple(dtype_of[name] for name in re.findall(r"%([\w.\-]+)", operands))
        for operands in re.findall(r" dot\(([^)]*)\)", hlo)
    ]


@pytest.mark.parametrize("impl", ["xla", "row_major"])
def test_on_cpu_only_row_major_keeps_every_gradient_matmul_in_bfloat16(impl):
    x = jnp.ones((256, 128), jnp.bfloat16)
    w = jnp.ones((128, 192), jnp.float32)

    def objective(x, w):
        return jnp.sum(matmul.dense(x, w, impl=impl).astype(jnp.float32) ** 2)

    hlo = jax.jit(jax.grad(objective, argnums=(0, 1))).lower(x, w).compile().as_text()
    dots = _dot_operand_dtypes(hlo)
    assert len(dots) == 3, dots  # forward, dx, dw
    all_bf16 = all(d == ("bf16", "bf16") for d in dots)
    # xla: XLA:CPU converts the transposed gradient dots to float32 (the slow path this
    # module avoids); row_major: all three stay bfloat16.
    assert all_bf16 == (impl == "row_major"), dots


def test_auto_picks_row_major_only_for_bfloat16_on_cpu():
    assert jax.default_backend() == "cpu"
    assert matmul.resolve_impl("auto", "bfloat16") == "row_major"
    assert matmul.resolve_impl("auto", "float32") == "xla"
    assert matmul.resolve_impl("xla", "bfloat16") == "xla"
