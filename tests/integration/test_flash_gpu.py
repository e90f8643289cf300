"""lmjax's Pallas GPU flash kernels: the tile picker against hand-computed rows and its own
search rules, and the kernels (Pallas interpreter on CPU) against the numpy loop, forward,
and against the XLA path's gradients, backward."""

import jax.numpy as jnp
import pytest

from lmjax.model import attention as attn_lib
from tests.unit.test_flash_gpu import _check_kernel


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim, dtype, packed, spec",
    [
        (4, 1, 128, jnp.bfloat16, False, attn_lib.PLAIN),
        (2, 1, 128, jnp.float32, True, attn_lib.Scores(scale=0.2, softcap=0.8, window=40)),
        (4, 2, 64, jnp.bfloat16, True, attn_lib.Scores(softcap=1.5, window=24)),
        (2, 1, 24, jnp.float32, True, attn_lib.PLAIN),  # zero-padded to 32 columns
    ],
    ids=[
        "mqa-causal-bf16-d128",
        "packed-window-softcap-f32-d128",
        "gqa-packed-window-bf16-d64",
        "packed-f32-d24-padded",
    ],
)
def test_kernel_matches_numpy_loop_with_gradients(heads, kv_heads, head_dim, dtype, packed, spec):
    _check_kernel(heads, kv_heads, head_dim, dtype, packed, spec)
