"""Prefill by the flash kernels `model.attention` selects: the Pallas kernels in the
interpreter against XLA's prefill and the numpy reference, and the prefill program lowered
for CUDA and compiled for a TPU holding the kernel's custom call and no score matrix."""

import contextlib
import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from lmjax import hardware
from lmjax.commands.experiment import load_experiment
from lmjax.config import MeshConfig
from lmjax.inference import generate as gen
from lmjax.model import attention as attn_lib, transformer
from lmjax.parallel import sharding
from lmjax.tools import aot, fused_kernel
from tests import numpy_llama, tpu_compiler
from tests.unit.test_flash_gpu import SMALL
from tests.unit.test_generate import GEMMA3_CONFIG, LENGTHS, MISTRAL_CONFIG, window_model
from tests.unit.test_gpu_export import H100, TRITON_CALL

# A Llama of the test Gemma 3's shapes: no window, every layer global.
LLAMA_CONFIG = {
    **{k: v for k, v in MISTRAL_CONFIG.items() if k != "sliding_window"},
    "model_type": "llama",
}


def interpreted_kernel(monkeypatch, kernel: str) -> list:
    """Makes `model.attention=kernel` run its Pallas kernel in the interpreter (the GPU one
    with small tiles, which the CPU cannot pick); returns the list of the query shapes it is
    called with (once per trace)."""
    real = {
        "splash": functools.partial(attn_lib._splash, interpret=True),
        "pallas_gpu": functools.partial(attn_lib._pallas_gpu, tiles=SMALL, interpret=True),
    }[kernel]
    calls: list = []

    def traced(q, *args, **kw):
        calls.append(q.shape)
        return real(q, *args, **kw)

    monkeypatch.setattr(attn_lib, "_" + kernel, traced)
    return calls


@pytest.mark.parametrize(
    "config, kernel",
    [(GEMMA3_CONFIG, "splash"), (GEMMA3_CONFIG, "pallas_gpu"), (LLAMA_CONFIG, "pallas_gpu")],
    ids=["gemma3-splash", "gemma3-pallas_gpu", "llama-pallas_gpu"],
)
def test_prefill_by_the_kernel_equals_xla_and_numpy_reference(monkeypatch, config, kernel):
    """Prompts of 11, 3 and 7 tokens (Gemma 3: two local layers of window 4, one global),
    padded to the kernel's block: logits equal the numpy reference and XLA's prefill to
    1e-4, the cache equals XLA's. The Llama runs under an 8-device mesh, whose batch
    devices do not divide its 3 rows."""
    _, cfg, params, tensors, padded = window_model(config)
    lengths = np.int32(LENGTHS)
    mesh = sharding.offline_mesh(MeshConfig()) if config is LLAMA_CONFIG else None

    def prefill(cfg):
        with sharding.activation_sharding(*mesh) if mesh else contextlib.nullcontext():
            run = functools.partial(gen.prefill_jit, max_len=16, context=sharding.context_key())
            return run(params, padded, lengths, cfg=cfg)

    want_logits, want_cache = prefill(cfg)
    calls = interpreted_kernel(monkeypatch, kernel)
    logits, cache = prefill(dataclasses.replace(cfg, attention=kernel))
    block = attn_lib._PREFILL_MULTIPLE[kernel]
    assert calls and {shape[1] for shape in calls} == {block}
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    for b, n in enumerate(LENGTHS):
        want = numpy_llama.forward(tensors, config, padded[b : b + 1, :n])[0, n - 1]
        np.testing.assert_allclose(logits[b], want, atol=1e-4, rtol=0)
    assert jax.tree.structure(cache) == jax.tree.structure(want_cache)
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def largest_array(program: str) -> int:
    """Elements of the largest array typed in a StableHLO program (`tensor<3x1000x8xf32>`)."""
    shapes = re.findall(r"tensor<((?:\d+x)+)[a-z]", program)
    return max(math.prod(map(int, s.rstrip("x").split("x"))) for s in shapes)


# Prompts of 1000 tokens (not a multiple of any block) for a Gemma 3 of window 4: XLA's
# prefill forms each layer's [batch, heads, 1000, 1000] score matrix.
BATCH, PROMPT = 4, 1000
SCORES = BATCH * GEMMA3_CONFIG["num_attention_heads"] * PROMPT**2


def prefill_args(cfg, shardings=None):
    """Abstract (params, tokens, lengths) of a prefill of BATCH x PROMPT tokens."""
    params = transformer.param_shapes(cfg)
    if shardings is not None:
        params = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings), params
        )
    tokens = jax.ShapeDtypeStruct((BATCH, PROMPT), jnp.int32, sharding=shardings)
    lengths = jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=shardings)
    return params, tokens, lengths


def prefill_fn(cfg):
    return jax.jit(
        lambda params, tokens, lengths: gen.prefill(params, cfg, tokens, lengths, PROMPT + 8)
    )


@pytest.mark.parametrize("impl", ["pallas_gpu", "xla"])
def test_prefill_lowers_for_cuda_with_the_flash_kernel_and_no_score_matrix(impl):
    """The prefill program for an H100 (`jax.export`): with pallas_gpu, one flash-forward
    kernel per kind of layer (local, global) and no array as large as a layer's scores;
    with xla, the scores are there (the check can fail)."""
    cfg = dataclasses.replace(window_model(GEMMA3_CONFIG)[1], attention=impl)
    mesh = AbstractMesh((1,) * 4, sharding.MESH_AXES, (AxisType.Auto,) * 4, abstract_device=H100)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.export.export(
            prefill_fn(cfg),
            platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
        )(*prefill_args(cfg)).mlir_module()
    kernels = re.findall(r'name = "(lmjax_flash_\w+)"', text)
    calls = sum(c == TRITON_CALL for c in fused_kernel.custom_calls(text))
    # smoke's `auto` at seq_len 40 leaves the train step's kernel unchecked, never the prefill's
    check = fused_kernel.verdict(
        text, load_experiment("smoke", ["data.seq_len=40"]), "gpu", "prefill"
    )
    if impl == "xla":
        assert calls == 0 and largest_array(text) >= SCORES
        assert not check.ok and f"the prefill has no {TRITON_CALL} custom call" in check.detail
    else:
        assert calls == 2 and kernels == ["lmjax_flash_forward"] * 2, kernels
        assert largest_array(text) < SCORES // 10
        assert check.ok and check.name == "prefill kernel", check
        assert check.detail == f"pallas_gpu: 2 {TRITON_CALL} call(s) in the lowered prefill"


@pytest.mark.parametrize("impl", ["splash", "xla"])
def test_prefill_compiles_for_tpu_with_splash_and_no_score_matrix(impl):
    """The prefill program for a v5e-4 (compile-only devices) under its offline mesh (4 rows
    over fsdp 4): with splash, it compiles with the kernel's tpu_custom_call, and no array
    as large as a layer's scores is lowered; with xla, the scores are there."""
    tpu_compiler.require()
    devices = aot.topology_devices(hardware.parse_target("v5litepod-4"))
    mesh, rules = sharding.offline_mesh(MeshConfig(), devices)
    cfg = dataclasses.replace(window_model(GEMMA3_CONFIG)[1], attention=impl)
    with sharding.activation_sharding(mesh, rules):
        lowered = prefill_fn(cfg).lower(*prefill_args(cfg, NamedSharding(mesh, P())))
    text = lowered.as_text()
    if impl == "xla":
        assert "tpu_custom_call" not in text and largest_array(text) >= SCORES
        return
    assert largest_array(text) < SCORES // 10
    compiled = lowered.compile().as_text()
    assert fused_kernel.custom_calls(compiled).count("tpu_custom_call") >= 2
    # the TPU's smoke experiment (auto, seq_len 64) checks splash in the prefill
    check = fused_kernel.verdict(compiled, load_experiment("smoke"), "tpu", "prefill")
    assert check.ok and check.applicable and check.detail.startswith("splash: "), check
