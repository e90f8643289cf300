"""Compiles megablox's three kernels (gmm forward, gmm for the input gradient, tgmm for the
weight gradient) with the blocks of `moe.megablox_tiling` for one chip of each TPU generation,
in bfloat16 and float32, at a Mixtral expert's shapes (8192 rows, 4096 x 14336, 8 experts):
a block rule that overflows a chip's scoped VMEM fails here, in seconds, with libtpu's
compile-only devices (no TPU needed).

    python scripts/check_megablox_vmem.py v5p-8 v5litepod-4 v6e-4
"""

import sys

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from lmjax import hardware
from lmjax.model import moe
from lmjax.tools import aot

ROWS, EMBED, MLP, EXPERTS = 8192, 4096, 14336, 8


def check(target_name: str, dtype) -> int:
    """Compiles the kernels for one chip of `target_name`; returns the Pallas calls found."""
    on = SingleDeviceSharding(aot.topology_devices(hardware.parse_target(target_name))[0])
    args = (
        jax.ShapeDtypeStruct((ROWS, EMBED), dtype, sharding=on),
        jax.ShapeDtypeStruct((EXPERTS, EMBED, MLP), dtype, sharding=on),
        jax.ShapeDtypeStruct((EXPERTS,), jnp.int32, sharding=on),
    )

    def loss(x, w, sizes):  # squared: the backward needs the forward's output
        out = moe.grouped_matmul(x, w, sizes, "megablox").astype(jnp.float32)
        return jnp.sum(jnp.square(out))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def main(names: list[str]) -> int:
    for name in names:
        for dtype in (jnp.bfloat16, jnp.float32):
            tiling = moe.megablox_tiling(ROWS, EMBED, MLP, dtype)
            calls = check(name, dtype)
            print(f"{name} {jnp.dtype(dtype).name} blocks {tiling}: compiled, {calls} kernels")
            if calls != 3:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["v5p-8", "v5litepod-4", "v6e-4"]))
