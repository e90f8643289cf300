"""The smoke and quickstart train steps lower for CUDA on this CPU-only machine (jax.export),
with the attention `auto` picks on a GPU: the Pallas (Triton) flash kernel."""

import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from lmjax import hardware
from lmjax.commands.experiment import load_experiment
from lmjax.model import attention, flash_gpu
from lmjax.parallel import sharding
from lmjax.tools import checklist, fused_kernel

TRITON_CALL = "__gpu$xla.gpu.triton"


# Triton lowering asks which GPU it compiles for; with none attached, an abstract one says so.
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="gpu")


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


def export_attention_grad_for_cuda(impl, shape, spec=attention.PLAIN) -> str:
    """StableHLO, lowered for CUDA (an H100), of the gradient of a loss of packed-document
    attention by `impl`: q [b, t, h, d], k and v [b, t, kv, d] in bfloat16."""
    b, t, h, kv, d = shape

    def loss(q, k, v, seg):
        out = attention.attention(q, k, v, segment_ids=seg, impl=impl, spec=spec)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    q_arg, kv_arg = (jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16) for n in (h, kv))
    mesh = AbstractMesh((1,) * 4, sharding.MESH_AXES, (AxisType.Auto,) * 4, abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.export.export(
            jax.jit(jax.grad(loss, argnums=(0, 1, 2))),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(q_arg, kv_arg, kv_arg, jax.ShapeDtypeStruct((b, t), jnp.int32)).mlir_module()


def test_smoke_kernel_check_passes_the_flash_kernel_and_fails_xla_attention_for_cuda():
    """`lmjax smoke`'s verdict on real CUDA lowerings: the Pallas kernel's module passes, the
    XLA attention's fails naming the fix; the CPU, model.attention=xla and an `auto` that
    picks XLA for the sequence length (40 tokens on a GPU, the smoke experiment's 64 on a
    TPU) are not applicable, each saying why."""
    config = load_experiment("smoke")  # auto, seq_len 64: pallas_gpu on a GPU
    shape = (1, 64, 4, 2, 64)
    kernel = fused_kernel.verdict(
        export_attention_grad_for_cuda("pallas_gpu", shape), config, "gpu"
    )
    assert kernel.ok and kernel.detail.startswith(f"pallas_gpu: 3 {TRITON_CALL} call(s)"), kernel
    xla_text = export_attention_grad_for_cuda("xla", shape)
    assert TRITON_CALL not in xla_text
    fallback = fused_kernel.verdict(xla_text, config, "gpu")
    assert not fallback.ok and f"has no {TRITON_CALL} custom call" in fallback.detail
    assert "model.attention=xla" in fallback.detail

    cpu = fused_kernel.verdict(xla_text, config, "cpu")
    assert cpu.ok and not cpu.applicable and cpu.detail.startswith("not applicable: cpu")
    chosen = fused_kernel.verdict(
        xla_text, load_experiment("smoke", ["model.attention=xla"]), "gpu"
    )
    assert chosen.ok and not chosen.applicable
    short = fused_kernel.verdict(xla_text, load_experiment("smoke", ["data.seq_len=40"]), "gpu")
    assert short.ok and not short.applicable
    assert "auto picks XLA on gpu for data.seq_len=40" in short.detail
    assert "multiple of 16 to check pallas_gpu" in short.detail
    tpu = fused_kernel.verdict(xla_text, config, "tpu")
    assert tpu.ok and not tpu.applicable and "multiple of 128 to check splash" in tpu.detail
    assert [line[:8] for line in checklist.lines([kernel, fallback, short])] == [
        "  [PASS]",
        "  [FAIL]",
        "  [N/A] ",
    ]


def test_flash_kernel_reads_grouped_kv_heads_in_place_with_tiles_for_the_gpu():
    """Forward and backward of the GPU kernel lowered for an H100, 8 query heads on 2 kv
    heads: every kernel takes the exported K and V arguments themselves, nothing in the
    module expands K or V to the query heads (the detector does find a jnp.repeat), and
    each kernel's launch (grid, stages, warps) is the one picked for 227 KiB."""
    b, t, h, kv, d = 1, 512, 8, 2, 128
    spec = attention.Scores(softcap=30.0, window=256)
    text = export_attention_grad_for_cuda("pallas_gpu", (b, t, h, kv, d), spec)
    q_arg, kv_arg = (jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16) for n in (h, kv))
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
