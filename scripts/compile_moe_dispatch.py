"""Compiles the dropless MoE block alone (`moe.moe_mlp`: route, dispatch, the three megablox
grouped matmuls, unsort and combine), forward and backward, for one v6e chip at a device's shapes in
MaxText's Mixtral 8x7B recipe (12 x 4096 tokens, embed 4096, 8 experts of 14336, top 2,
bfloat16), and prints the compile's wall and CPU seconds and its temporaries: the probe the
README's "Where that compile's time goes" measures the dispatch with, in about a minute.

    python scripts/compile_moe_dispatch.py
"""

import dataclasses
import time

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from lmjax import hardware
from lmjax.config import ModelConfig
from lmjax.model import moe
from lmjax.tools import aot

TOKENS, EMBED, MLP, EXPERTS = 12 * 4096, 4096, 14336, 8


def main() -> None:
    cfg = dataclasses.replace(
        ModelConfig(), moe_experts=EXPERTS, moe_top_k=2, moe_matmul="megablox"
    )
    on = SingleDeviceSharding(aot.topology_devices(hardware.parse_target("v6e-4"))[0])

    def shaped(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=on)

    x = shaped(TOKENS, EMBED)
    p = {
        "router": shaped(EMBED, EXPERTS),
        "w_gate": shaped(EXPERTS, EMBED, MLP),
        "w_up": shaped(EXPERTS, EMBED, MLP),
        "w_down": shaped(EXPERTS, MLP, EMBED),
    }

    def loss(x, p):  # squared: the backward needs the forward's output
        y, _ = moe.moe_mlp(x[None], p, cfg)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))

    wall, cpu = time.perf_counter(), time.process_time()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, p).compile()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    temps = compiled.memory_analysis().temp_size_in_bytes / 2**30
    kernels = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    print(
        f"dispatch compiled in {wall:.1f} s wall, {cpu:.1f} s CPU; "
        f"{temps:.2f} GiB of temporaries; {kernels} Pallas kernels"
    )


if __name__ == "__main__":
    main()
