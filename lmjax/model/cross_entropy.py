"""Next-token cross-entropy fused with the vocabulary projection, with a hand-written VJP.

Autodiff through `logsumexp(x @ w)` keeps the float32 logits [batch, seq, vocab] for the
backward pass and runs three passes over them after the forward one. Here the forward pass
of `loss_sums` already forms d(objective)/d(logits) chunk by chunk and contracts it at once
into the gradients of the hidden states and of the projection; only those two (and no
logits) are kept for the backward pass, which merely scales them by the incoming cotangent.
The three matmuls are the minimum (no recomputed projection, unlike a rematerialized
chunked loss), and the logits gradient enters both gradient matmuls in the compute dtype
(accumulated in float32), through `lmjax.model.matmul` so that on a CPU they stay on the fast
bfloat16 path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.model.matmul import transpose
from lmjax.parallel.sharding import constrain


def _chunks(a, chunk: int):
    """[batch, seq, ...] -> [seq // chunk, batch, chunk, ...] (a scan over sequence chunks)."""
    b, s = a.shape[:2]
    return a.reshape(b, s // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)


def _unchunk(a):
    """Inverse of `_chunks`."""
    n, b, c = a.shape[:3]
    return a.swapaxes(0, 1).reshape(b, n * c, *a.shape[3:])


def _chunk_stats(x, w, targets, softcap: float):
    """x: [batch, chunk, embed]; w: [embed, vocab]; targets: [batch, chunk] ->
    (logits [batch, chunk, vocab] f32, logsumexp [batch, chunk], target logit [batch, chunk]),
    the logits soft-capped (softcap * tanh(logits / softcap)) when softcap > 0."""
    logits = jnp.einsum("bcd,dv->bcv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    if softcap > 0:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = constrain(logits, ("act_batch", "act_seq", "act_vocab"))
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return logits, jax.nn.logsumexp(logits, axis=-1), target_logit


def _sums(logz, target_logit, weights, z_loss: float):
    nll_sum = jnp.sum((logz - target_logit) * weights)
    z_sum = jnp.sum(jnp.square(logz) * weights)
    return nll_sum + z_loss * z_sum, nll_sum, z_sum


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(x, w, targets, weights, z_loss: float, softcap: float, chunk: int, impl: str):
    def body(carry, xtw):
        x_c, t_c, w_c = xtw
        _, logz, target_logit = _chunk_stats(x_c, w, t_c, softcap)
        return jax.tree.map(jnp.add, carry, _sums(logz, target_logit, w_c, z_loss)), None

    zero = jnp.zeros((), jnp.float32)
    sums, _ = jax.lax.scan(
        body,
        (zero, zero, zero),
        (_chunks(x, chunk), _chunks(targets, chunk), _chunks(weights, chunk)),
    )
    return sums


def _fused_fwd(x, w, targets, weights, z_loss: float, softcap: float, chunk: int, impl: str):
    w_t = transpose(w.astype(x.dtype), impl)  # [vocab, embed], made once, not per chunk

    def body(carry, xtw):
        sums, dw = carry
        x_c, t_c, w_c = xtw
        logits, logz, target_logit = _chunk_stats(x_c, w, t_c, softcap)
        # d objective / d logits = weight * ((1 + 2 z logz) softmax - onehot(target))
        scale = (w_c * (1.0 + 2.0 * z_loss * logz))[..., None]
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == t_c[..., None]
        dlogits = scale * jnp.exp(logits - logz[..., None]) - jnp.where(onehot, w_c[..., None], 0.0)
        if softcap > 0:  # through the cap: d(c tanh(u / c)) / du = 1 - (capped / c)**2
            dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
        dlogits = constrain(dlogits, ("act_batch", "act_seq", "act_vocab")).astype(x_c.dtype)
        # [batch * chunk, vocab] and [batch * chunk, embed] rows for the two gradient matmuls
        dl_rows, x_rows = dlogits.reshape(-1, dlogits.shape[-1]), x_c.reshape(-1, x_c.shape[-1])
        dx_c = jnp.matmul(dl_rows, w_t, preferred_element_type=jnp.float32)
        dx_c = dx_c.astype(x_c.dtype).reshape(x_c.shape)
        dw = dw + jnp.matmul(transpose(x_rows, impl), dl_rows, preferred_element_type=jnp.float32)
        sums = jax.tree.map(jnp.add, sums, _sums(logz, target_logit, w_c, z_loss))
        return (sums, dw), dx_c

    zero = jnp.zeros((), jnp.float32)
    (sums, dw), dx = jax.lax.scan(
        body,
        ((zero, zero, zero), jnp.zeros(w.shape, jnp.float32)),
        (_chunks(x, chunk), _chunks(targets, chunk), _chunks(weights, chunk)),
    )
    return sums, (_unchunk(dx), dw.astype(w.dtype), targets, weights)


def _fused_bwd(z_loss, softcap, chunk, impl, res, cotangents):
    dx, dw, targets, weights = res
    g = cotangents[0]  # only the objective is differentiable; see `loss_sums`
    # targets are integers (float0 cotangent); weights enter through stop_gradient
    return (
        (g * dx.astype(jnp.float32)).astype(dx.dtype),
        (g * dw).astype(dw.dtype),
        np.zeros(targets.shape, jax.dtypes.float0),
        jnp.zeros_like(weights),
    )


_fused.defvjp(_fused_fwd, _fused_bwd)


def loss_sums(
    x,
    w,
    targets,
    weights,
    *,
    z_loss: float = 0.0,
    softcap: float = 0.0,
    chunk: int = 0,
    impl: str = "xla",
):
    """Summed next-token cross-entropy of the projection `x @ w`.

    Args:
      x: [batch, seq, embed] final hidden states (after the final norm), compute dtype.
      w: [embed, vocab] output projection (any dtype; cast to x's dtype for the matmuls).
      targets: [batch, seq] int target token ids.
      weights: [batch, seq] per-token weights (the loss mask); not differentiated.
      z_loss: coefficient of the logsumexp**2 regularizer in the objective.
      softcap: >0: the logits are softcap * tanh((x @ w) / softcap) (Gemma 2).
      chunk: sequence chunk length (0: the whole sequence at once); only
        [batch, chunk, vocab] logits exist at a time.
      impl: how the gradient matmuls run, "xla" or "row_major" (`lmjax.model.matmul`).
    Returns:
      (objective, nll_sum, z_sum) float32 scalars, objective = nll_sum + z_loss * z_sum.
      Only `objective` carries gradients (to x and w); the other two are for reporting.
    """
    seq = x.shape[1]
    chunk = seq if chunk <= 0 or chunk >= seq else chunk
    if seq % chunk:
        raise ValueError(f"loss chunk {chunk} must divide the sequence length {seq}")
    weights = jax.lax.stop_gradient(weights.astype(jnp.float32))
    objective, nll_sum, z_sum = _fused(
        x, w, targets, weights, float(z_loss), float(softcap), chunk, impl
    )
    return objective, jax.lax.stop_gradient(nll_sum), jax.lax.stop_gradient(z_sum)
