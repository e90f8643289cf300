"""Per-chip temporary memory of the prefill program of a preset, compiled for a TPU
(libtpu's compile-only devices, no TPU needed), by each attention implementation.

    PYTHONPATH=. python scripts/measure_prefill_memory.py --experiment gemma3_12b \
        --target v5p-8 --prompt-len 32000 --attention splash xla

Params and prompts are laid out as `lmjax generate` lays them (`sharding.offline_mesh`,
every chip on fsdp); prints one line per implementation: the compiler's temporaries
(activations, scores), the program's arguments and the Pallas kernel calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax import hardware
from lmjax.checkpoint import params_dir
from lmjax.commands.experiment import load_experiment
from lmjax.config import MeshConfig
from lmjax.inference import generate as gen
from lmjax.parallel import sharding
from lmjax.tools import aot, fused_kernel

GiB = 1024**3


def compile_prefill(cfg, mesh, rules, batch: int, prompt_len: int):
    """The compiled prefill of `batch` prompts of `prompt_len` tokens (cache: 64 new)."""
    params = params_dir.sharded_shapes(cfg, mesh, rules)
    rows = NamedSharding(mesh, P())
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    fn = jax.jit(lambda p, t, n: gen.prefill(p, cfg, t, n, prompt_len + 64))
    with sharding.activation_sharding(mesh, rules):
        return fn.lower(params, tokens, lengths).compile()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="gemma3_12b")
    parser.add_argument("--target", default="v5p-8")
    parser.add_argument("--prompt-len", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--attention", nargs="+", default=["splash", "xla"])
    args = parser.parse_args()
    devices = aot.topology_devices(hardware.parse_target(args.target))
    mesh, rules = sharding.offline_mesh(MeshConfig(), devices)
    model = load_experiment(args.experiment).model
    for impl in args.attention:
        cfg = dataclasses.replace(model, attention=impl)
        start = time.perf_counter()
        compiled = compile_prefill(cfg, mesh, rules, args.batch, args.prompt_len)
        memory = compiled.memory_analysis()
        calls = fused_kernel.custom_calls(compiled.as_text()).count("tpu_custom_call")
        print(
            f"{args.experiment} {args.target} batch {args.batch} prompt {args.prompt_len} "
            f"{impl}: temp {memory.temp_size_in_bytes / GiB:.2f} GiB, arguments "
            f"{memory.argument_size_in_bytes / GiB:.2f} GiB per chip, {calls} tpu_custom_call, "
            f"compiled in {time.perf_counter() - start:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
