"""lmjax.model.matmul: projections with row-major backward matmuls, against numpy, and the property
they exist for: on XLA:CPU every matmul of a bfloat16 projection and its gradients stays in
bfloat16 (the transposed forms autodiff produces are converted to float32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tests.configs import SPLITTABLE, TINY_LM
from tests.unit.test_matmul import _dot_operand_dtypes


def test_row_major_trains_like_xla_on_a_sharded_bfloat16_mesh():
    """The flattened row-major copies meet sharded activations (data, fsdp and tensor axes):
    the step must compute the same loss and gradient norm as plain autodiff."""
    from lmjax.config import Config, DataConfig, MeshConfig, OptimConfig, RunConfig
    from lmjax.data.pipeline import synthetic_batch
    from lmjax.parallel import host_rows, sharding
    from lmjax.train import trainer as trainer_lib

    results = {}
    for impl in ("xla", "row_major"):
        cfg = Config(
            model=dataclasses.replace(SPLITTABLE, dtype="bfloat16", remat="full", matmul=impl),
            mesh=MeshConfig(data=2, fsdp=2, tensor=2),
            data=DataConfig(source="synthetic", batch_size=8, seq_len=64),
            optim=OptimConfig(lr=1e-2, warmup_steps=0),
            run=RunConfig(steps=3),
        )
        trainer = trainer_lib.make_trainer(cfg, sharding.make_mesh(cfg.mesh))
        state = trainer.init_fn()
        batch = host_rows.global_batch(
            synthetic_batch(0, 0, 0, range(8), 64, 256), trainer.batch_sharding
        )
        results[impl] = []
        for _ in range(3):
            state, m = trainer.step_fn(state, batch)
            results[impl].append((float(m["loss"]), float(m["grad_norm"])))
    assert results["xla"][2][0] < results["xla"][0][0] - 0.05  # it learns the batch
    np.testing.assert_allclose(results["row_major"], results["xla"], rtol=2e-2)


def test_save_dots_keeps_row_major_projection_outputs_instead_of_recomputing_them():
    """Remat policies see the custom VJP, not a dot; its named output must still be saved."""
    from lmjax.model import transformer

    # bfloat16: the dots whose operand dtypes are counted
    cfg = dataclasses.replace(TINY_LM, dtype="bfloat16", matmul="row_major")
    tokens = jnp.zeros((2, 16), jnp.int32)

    def dots(remat):
        c = dataclasses.replace(cfg, remat=remat)
        params = jax.eval_shape(lambda: transformer.init(c, jax.random.PRNGKey(0)))
        grad = jax.jit(jax.grad(lambda p: jnp.sum(transformer.forward(p, tokens, c))))
        return len(_dot_operand_dtypes(grad.lower(params).compile().as_text()))

    # full remat runs the projections' forward matmuls again in the backward; save_dots not
    assert dots("save_dots") <= dots("full") - 5
