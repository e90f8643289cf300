"""Projections `x @ w` whose backward matmuls stay on XLA:CPU's fast bfloat16 path.

XLA:CPU runs a bfloat16 dot at full speed (through YNNPACK) only when it is canonical: both
operands row-major, contracting the left operand's last dimension with the right operand's
first. The two matmuls that autodiff derives for a projection, `dx = dy @ w.T` and
`dw = x.T @ dy`, contract a transposed operand, and XLA:CPU converts such a dot to float32,
which is slower (figures: the README's Benchmarks). A transpose alone does not help, since
XLA folds it into the dot's layout; `transpose` forces a real row-major copy: one pass over an
operand, small next to the matmul it feeds.

`impl` (the `model.matmul` option):
  * ``xla``: plain dots and autodiff; what GPUs and TPUs want (their dots take any layout).
  * ``row_major``: `dense` has a custom VJP whose backward matmuls take row-major transposed
    copies; the weight gradient is accumulated and returned in float32.
  * ``auto``: row_major for bfloat16 compute on the CPU backend, xla otherwise.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmjax.config import MATMUL_IMPLS as IMPLS

DENSE_NAME = "dense"  # the checkpoint name of every row_major projection output


def resolve_impl(impl: str, dtype) -> str:
    """Maps ``auto`` to the implementation for the default backend and compute dtype."""
    if impl != "auto":
        return impl
    cpu_bf16 = jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.bfloat16
    return "row_major" if cpu_bf16 else "xla"


def transpose(a, impl: str):
    """a: [m, n] -> a.T [n, m], for use as a matmul operand.

    "row_major": a real row-major copy, not a layout change (flattening needs the row-major
    layout; the barrier keeps XLA from undoing the copy); "xla": the plain transpose.
    """
    if impl != "row_major":
        return a.T
    m, n = a.shape
    return jax.lax.optimization_barrier(a.T.reshape(m * n)).reshape(n, m)


@jax.custom_vjp
def _dense_row_major(x, w):
    """x: [m, k] in the compute dtype; w: [k, n] in any dtype -> [m, n] in x's dtype."""
    return x @ w.astype(x.dtype)


def _dense_fwd(x, w):
    return _dense_row_major(x, w), (x, w)


def _dense_bwd(res, dy):
    x, w = res
    dx = dy @ transpose(w.astype(dy.dtype), "row_major")
    dw = jnp.matmul(transpose(x, "row_major"), dy, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_dense_row_major.defvjp(_dense_fwd, _dense_bwd)


def dense(x, w, *, contract: int = 1, impl: str = "xla"):
    """Contracts the last `contract` dims of x with the first `contract` dims of w.

    x: [..., *in] in the compute dtype; w: [*in, *out] (e.g. a float32 parameter, cast to
    x's dtype for the matmul) -> [..., *out] in x's dtype. `impl`: "xla" or "row_major"
    (resolve "auto" with `resolve_impl` first).
    """
    if impl == "xla":
        return jnp.tensordot(x, w.astype(x.dtype), axes=contract)
    if impl != "row_major":
        raise ValueError(f"unknown matmul implementation {impl!r}: use one of {IMPLS}")
    lead, out = x.shape[: x.ndim - contract], w.shape[contract:]
    k = math.prod(w.shape[:contract])
    y = _dense_row_major(x.reshape(-1, k), w.reshape(k, -1))
    # Remat policies see a custom VJP, not a dot: the name lets `save_dots` keep it.
    return checkpoint_name(y.reshape(*lead, *out), DENSE_NAME)
