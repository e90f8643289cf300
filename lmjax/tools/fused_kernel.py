"""Do the train step and the prefill run the fused attention kernel their config selects?
`lmjax smoke` asks, so that a GPU or TPU smoke test cannot pass on the XLA fallback.

`verdict` decides from a program's text alone (StableHLO from `.lower().as_text()` or
`jax.export`, or compiled HLO): each fused kernel is one custom call, which XLA executes as
it is (no XLA pass replaces a custom call with other ops), so a call in the program XLA
receives is the kernel running, and its absence is the fallback. `train_step_program` and
`prefill_program` give that text for a config on this machine's devices: the train step
lowered (not compiled) with the same jit, shardings and shapes as `lmjax train`, and the
prefill of one prompt as `lmjax generate` lowers it.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from lmjax.batch import abstract_batch
from lmjax.checkpoint import checkpointer
from lmjax.config import Config
from lmjax.inference import generate, saved_run
from lmjax.model import attention, transformer
from lmjax.parallel import sharding
from lmjax.tools import doctor
from lmjax.tools.checklist import Check
from lmjax.train import trainer as trainer_lib

# The custom-call target (or its start) of each fused kernel: lmjax's Pallas Triton kernel,
# jax's cuDNN flash attention (__cudnn$fmhaSoftmax, ...Backward, ...), the Pallas TPU
# (Mosaic) splash kernel.
FUSED_CALLS = {
    "pallas_gpu": "__gpu$xla.gpu.triton",
    "cudnn": "__cudnn$fmha",
    "splash": "tpu_custom_call",
}
# A custom call's target in StableHLO's pretty (`custom_call @T(`) and generic
# (`call_target_name = "T"`) forms and in HLO text (`custom_call_target="T"`).
_TARGET = re.compile(r'(?:custom_call @|call_target_name = "|custom_call_target=")([^\s("]+)')
# The platforms that have a fused kernel, and the seq_len multiple `auto` needs for it.
_KERNEL_OF = {"gpu": ("pallas_gpu", 16), "tpu": ("splash", 128)}
# The programs checked, and each one's check name.
CHECK_NAMES = {"train step": "attention kernel", "prefill": "prefill kernel"}
# The prompt `prefill_program` lowers: a length no kernel block divides, so that the prefill's
# padding to the kernel's block is part of what is checked.
PREFILL_PROMPT = 37


def custom_calls(program: str) -> list[str]:
    """The target of every custom call in `program`, in order."""
    return _TARGET.findall(program)


def verdict(program: str, config: Config, backend: str, phase: str = "train step") -> Check:
    """Whether `program` (the `phase` of `config` for `backend`: "train step" or "prefill")
    runs the fused attention kernel that `config` selects there: failed when it selects one
    and the program has no call of it; not applicable where no fused kernel is selected (the
    CPU, model.attention=xla, or, in the train step, `auto` on a sequence length the
    platform's kernel does not take, which it names with the length that would check the
    kernel; the prefill pads any prompt to the kernel's block, so `auto` is always the
    kernel there)."""
    name = CHECK_NAMES[phase]
    seq_len = config.data.seq_len if phase == "train step" else None
    impl = attention.resolve_impl(config.model.attention, backend, seq_len)
    if impl == "xla":
        if backend in _KERNEL_OF and config.model.attention == "auto":
            # Not a failure: `auto` picks XLA for such a length by design (the TPU's smoke
            # experiment, 64 tokens, is one); the line says the kernel went unchecked, and why.
            kernel, multiple = _KERNEL_OF[backend]
            why = (
                f"model.attention=auto picks XLA on {backend} for data.seq_len="
                f"{config.data.seq_len} ({doctor.WHY_XLA[backend]}); set data.seq_len to a "
                f"multiple of {multiple} to check {kernel}"
            )
        elif backend in _KERNEL_OF:
            why = "model.attention=xla"
        else:
            why = f"{backend} runs XLA attention (no fused kernel on this platform)"
        return Check(name, True, f"not applicable: {why}", applicable=False)
    target = FUSED_CALLS[impl]
    found = sum(call.startswith(target) for call in custom_calls(program))
    if not found:
        return Check(
            name,
            False,
            f"model.attention resolves to {impl} on {backend}, but the {phase} has no "
            f"{target} custom call: it would run without the fused kernel. Check the jax "
            "version (`lmjax doctor`) and model.attention; model.attention=xla runs "
            "without it knowingly",
        )
    return Check(name, True, f"{impl}: {found} {target} call(s) in the lowered {phase}")


def train_step_program(config: Config) -> str:
    """The StableHLO text of `config`'s train step on this machine's devices, lowered as
    `lmjax train` and `lmjax bench` lower it (nothing is compiled or allocated)."""
    trainer = trainer_lib.make_trainer(config, sharding.make_mesh(config.mesh))
    state = checkpointer.abstract_state(trainer.init_fn, trainer.state_shardings)
    batch = abstract_batch(config.data.batch_size, config.data.seq_len, trainer.batch_sharding)
    return trainer.step_fn.lower(state, batch).as_text()


def prefill_program(config: Config) -> str:
    """The StableHLO text of `config`'s prefill of one prompt of `PREFILL_PROMPT` tokens on
    this machine's devices, lowered as `lmjax generate` lowers it, under the saved run's
    offline mesh (nothing is compiled or allocated)."""
    params = transformer.param_shapes(config.model)
    tokens = jax.ShapeDtypeStruct((1, PREFILL_PROMPT), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    with saved_run.context(config):
        lowered = generate.prefill_jit.lower(
            params,
            tokens,
            lengths,
            cfg=config.model,
            max_len=PREFILL_PROMPT + 16,
            context=sharding.context_key(),
        )
    return lowered.as_text()
