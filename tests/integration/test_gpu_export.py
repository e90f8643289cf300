"""The smoke and quickstart train steps lower for CUDA on this CPU-only machine (jax.export),
with the attention `auto` picks on a GPU: the Pallas (Triton) flash kernel."""

import dataclasses

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType

from lmjax.batch import abstract_batch
from lmjax.checkpoint import checkpointer
from lmjax.commands.experiment import load_experiment
from lmjax.model import attention
from lmjax.parallel import sharding
from lmjax.tools import fused_kernel
from lmjax.train import trainer as trainer_lib
from tests.unit.test_gpu_export import H100, TRITON_CALL


def export_train_step_for_cuda(experiment: str, sets=()) -> jax.export.Exported:
    """The jitted train step of `experiment` on one GPU, lowered to StableHLO for CUDA."""
    config = load_experiment(experiment, list(sets))
    on_gpu = attention.resolve_impl(config.model.attention, "gpu")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention=on_gpu))
    mesh = AbstractMesh((1,) * 4, sharding.MESH_AXES, (AxisType.Auto,) * 4, abstract_device=H100)
    trainer = trainer_lib.make_trainer(config, mesh)
    state = checkpointer.abstract_state(trainer.init_fn, trainer.state_shardings)
    batch = abstract_batch(config.data.batch_size, config.data.seq_len, trainer.batch_sharding)
    with jax.sharding.use_abstract_mesh(mesh):
        # The kernel's Triton custom call is not on export's list of stable custom calls;
        # it is compiled by the XLA of the same jax on the GPU, never deserialized elsewhere.
        return jax.export.export(
            trainer.step_fn,
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(state, batch)


@pytest.mark.parametrize("experiment, dtype", [("smoke", "float32"), ("quickstart", "bfloat16")])
def test_train_step_lowers_for_cuda_with_the_flash_kernel(experiment, dtype):
    exported = export_train_step_for_cuda(experiment)
    assert exported.platforms == ("cuda",)
    text = exported.mlir_module()
    # forward kernel + backward (preprocess, dq/dkv) per scanned layer body
    assert text.count(f"@{TRITON_CALL}") >= 2
    assert all(f"lmjax_flash_{k}" in text for k in ("forward", "dq", "dkv"))
    assert f"tensor<{'f32' if dtype == 'float32' else 'bf16'}" in text
    check = fused_kernel.verdict(text, load_experiment(experiment), "gpu")
    assert check.ok and check.detail.startswith("pallas_gpu: "), check
