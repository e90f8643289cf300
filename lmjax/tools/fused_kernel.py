"""Does the train step run the fused attention kernel its config selects? `lmjax smoke` asks,
so that a GPU or TPU smoke test cannot pass on the XLA fallback.

`verdict` decides from a program's text alone (StableHLO from `.lower().as_text()` or
`jax.export`, or compiled HLO): each fused kernel is one custom call, which XLA executes as
it is (no XLA pass replaces a custom call with other ops), so a call in the program XLA
receives is the kernel running, and its absence is the fallback. `train_step_program` gives
that text for a config on this machine's devices: the train step lowered (not compiled) with
the same jit, shardings and shapes as `lmjax train`.
"""

from __future__ import annotations

import re

from lmjax.batch import abstract_batch
from lmjax.checkpoint import checkpointer
from lmjax.config import Config
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


def custom_calls(program: str) -> list[str]:
    """The target of every custom call in `program`, in order."""
    return _TARGET.findall(program)


def verdict(program: str, config: Config, backend: str) -> Check:
    """Whether `program` (the train step of `config` for `backend`) runs the fused attention
    kernel that `config` selects there: failed when it selects one and the program has no
    call of it; not applicable where no fused kernel is selected (the CPU, model.attention=
    xla, or `auto` on a sequence length the platform's kernel does not take, which it names
    with the length that would check the kernel)."""
    impl = doctor.attention_impl(config, backend)
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
        return Check("attention kernel", True, f"not applicable: {why}", applicable=False)
    target = FUSED_CALLS[impl]
    found = sum(call.startswith(target) for call in custom_calls(program))
    if not found:
        return Check(
            "attention kernel",
            False,
            f"model.attention resolves to {impl} on {backend}, but the train step has no "
            f"{target} custom call: it would run without the fused kernel. Check the jax "
            "version (`lmjax doctor`) and model.attention; model.attention=xla runs "
            "without it knowingly",
        )
    return Check(
        "attention kernel", True, f"{impl}: {found} {target} call(s) in the lowered train step"
    )


def train_step_program(config: Config) -> str:
    """The StableHLO text of `config`'s train step on this machine's devices, lowered as
    `lmjax train` and `lmjax bench` lower it (nothing is compiled or allocated)."""
    trainer = trainer_lib.make_trainer(config, sharding.make_mesh(config.mesh))
    state = checkpointer.abstract_state(trainer.init_fn, trainer.state_shardings)
    batch = abstract_batch(config.data.batch_size, config.data.seq_len, trainer.batch_sharding)
    return trainer.step_fn.lower(state, batch).as_text()
