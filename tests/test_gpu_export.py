"""The smoke and quickstart train steps lower for CUDA on this CPU-only machine (jax.export),
with the attention `auto` picks on a GPU: the Pallas (Triton) flash kernel."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from lmjax import cli, hardware
from lmjax.batch import abstract_batch
from lmjax.checkpoint import checkpointer
from lmjax.model import attention, flash_gpu
from lmjax.parallel import sharding
from lmjax.train import trainer as trainer_lib

TRITON_CALL = "__gpu$xla.gpu.triton"
# Triton lowering asks which GPU it compiles for; with none attached, an abstract one says so.
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")


def export_train_step_for_cuda(experiment: str, sets=()) -> jax.export.Exported:
    """The jitted train step of `experiment` on one GPU, lowered to StableHLO for CUDA."""
    config = cli.load_experiment(experiment, list(sets))
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


@pytest.mark.slow
@pytest.mark.parametrize("experiment, dtype", [("smoke", "float32"), ("quickstart", "bfloat16")])
def test_train_step_lowers_for_cuda_with_the_flash_kernel(experiment, dtype):
    exported = export_train_step_for_cuda(experiment)
    assert exported.platforms == ("cuda",)
    text = exported.mlir_module()
    # forward kernel + backward (preprocess, dq/dkv) per scanned layer body
    assert text.count(f"@{TRITON_CALL}") >= 2
    assert all(f"lmjax_flash_{k}" in text for k in ("forward", "dq", "dkv"))
    assert f"tensor<{'f32' if dtype == 'float32' else 'bf16'}" in text


def kv_expansions(text: str, kv_shape: tuple[int, ...]) -> list[str]:
    """The non-kernel ops of a StableHLO module that make a bigger tensor out of one shaped
    like K or V (`kv_shape`): a broadcast or repeat of K/V to the query heads."""
    kv_type = "tensor<" + "x".join(map(str, kv_shape)) + "x"
    size = math.prod(kv_shape)
    found = []
    for line in text.splitlines():
        if not re.match(r"\s*%\S+ = ", line) or "custom_call" in line or " -> " not in line:
            continue
        operands, results = line.rsplit(" : ", 1)[-1].split(" -> ", 1)
        out_sizes = [
            math.prod(map(int, d.split("x")[:-1])) for d in re.findall(r"tensor<([^>]+)>", results)
        ]
        if kv_type in operands and any(s > size for s in out_sizes):
            found.append(line.strip())
    return found


def test_flash_kernel_reads_grouped_kv_heads_in_place_with_tiles_for_the_gpu():
    """Forward and backward of the GPU kernel lowered for an H100, 8 query heads on 2 kv
    heads: every kernel takes the exported K and V arguments themselves, nothing in the
    module expands K or V to the query heads (the detector does find a jnp.repeat), and
    each kernel's launch (grid, stages, warps) is the one picked for 227 KiB."""
    b, t, h, kv, d = 1, 512, 8, 2, 128
    spec = attention.Scores(softcap=30.0, window=256)

    def loss(q, k, v, seg):
        out = attention.attention(q, k, v, segment_ids=seg, impl="pallas_gpu", spec=spec)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    q_arg, kv_arg = (jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16) for n in (h, kv))
    mesh = AbstractMesh((1,) * 4, sharding.MESH_AXES, (AxisType.Auto,) * 4, abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.export.export(
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(q_arg, kv_arg, kv_arg, jax.ShapeDtypeStruct((b, t), jnp.int32)).mlir_module()
    calls = re.findall(rf"custom_call @{re.escape(TRITON_CALL)}\(([^)]*)\).*", text)
    assert len(calls) == 3
    for operands in calls:
        assert operands.split(", ")[1:3] == ["%arg1", "%arg2"], operands
    assert kv_expansions(text, (b, t, kv, d)) == []
    repeated = jax.jit(lambda q, k: q + jnp.repeat(k, h // kv, axis=2)).lower(q_arg, kv_arg)
    assert kv_expansions(repeated.as_text(debug_info=True), (b, t, kv, d))

    smem = hardware.shared_memory_per_block(90)
    forward = flash_gpu.pick_tiles(t, d, 2, smem)
    backward = flash_gpu.pick_tiles(t, d, 2, smem, backward=True)
    launches = {
        name: (int(grid), int(stages), int(warps))
        for grid, name, stages, warps in re.findall(
            r'grid_x = (\d+) .*?name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+)', text
        )
    }
    assert launches == {
        "lmjax_flash_forward": (t // forward.block_q, forward.num_stages, forward.num_warps),
        "lmjax_flash_dq": (t // backward.block_q, backward.num_stages, backward.num_warps),
        "lmjax_flash_dkv": (t // backward.block_k, backward.num_stages, backward.num_warps),
    }
