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


@pytest.mark.slow
def test_row_major_trains_like_xla_on_a_sharded_bfloat16_mesh():
    """The flattened row-major copies meet sharded activations (data, fsdp and tensor axes):
    the step must compute the same loss and gradient norm as plain autodiff."""
    from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig
    from lmjax.data.pipeline import synthetic_batch
    from lmjax.parallel import sharding
    from lmjax.train import trainer as trainer_lib

    results = {}
    for impl in ("xla", "row_major"):
        cfg = Config(
            model=ModelConfig(
                vocab_size=256,
                d_model=64,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                head_dim=16,
                d_mlp=192,
                max_seq_len=64,
                dtype="bfloat16",
                remat="full",
                matmul=impl,
            ),
            mesh=MeshConfig(data=2, fsdp=2, tensor=2),
            data=DataConfig(source="synthetic", batch_size=8, seq_len=64),
            optim=OptimConfig(lr=1e-2, warmup_steps=0),
            run=RunConfig(steps=3),
        )
        trainer = trainer_lib.make_trainer(cfg, sharding.make_mesh(cfg.mesh))
        state = trainer.init_fn()
        batch = trainer_lib.global_batch(
            synthetic_batch(0, 0, 0, range(8), 64, 256), trainer.batch_sharding
        )
        results[impl] = []
        for _ in range(3):
            state, m = trainer.step_fn(state, batch)
            results[impl].append((float(m["loss"]), float(m["grad_norm"])))
    assert results["xla"][2][0] < results["xla"][0][0] - 0.05  # it learns the batch
    np.testing.assert_allclose(results["row_major"], results["xla"], rtol=2e-2)


@pytest.mark.slow
def test_save_dots_keeps_row_major_projection_outputs_instead_of_recomputing_them():
    """Remat policies see the custom VJP, not a dot; its named output must still be saved."""
    import dataclasses

    from lmjax.config import ModelConfig
    from lmjax.model import transformer

    cfg = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        d_mlp=64,
        max_seq_len=16,
        dtype="bfloat16",
        matmul="row_major",
    )
    tokens = jnp.zeros((2, 16), jnp.int32)

    def dots(remat):
        c = dataclasses.replace(cfg, remat=remat)
        params = jax.eval_shape(lambda: transformer.init(c, jax.random.PRNGKey(0)))
        grad = jax.jit(jax.grad(lambda p: jnp.sum(transformer.forward(p, tokens, c))))
        return len(_dot_operand_dtypes(grad.lower(params).compile().as_text()))

    # full remat runs the projections' forward matmuls again in the backward; save_dots not
    assert dots("save_dots") <= dots("full") - 5
