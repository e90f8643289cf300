"""Causal grouped-query attention with packed-document masking, behind one entry point.

Implementations:
  * ``xla``: a plain einsum/softmax reference, float32 softmax, runs everywhere.
  * ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, flash attention on
    NVIDIA GPUs.
  * ``splash``: the Pallas TPU splash-attention kernel (TPU only).
  * ``auto``: cudnn on GPU, splash on TPU, xla elsewhere.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def make_mask(q_segment_ids, kv_segment_ids, q_index, kv_index):
    """Boolean attention mask, True where a query may attend to a key.

    Args:
      q_segment_ids: [batch, q_len] int document ids of the queries (None: one document).
      kv_segment_ids: [batch, kv_len] int document ids of the keys (None: one document).
      q_index: [batch, q_len] or [q_len] absolute position of each query in the sequence.
      kv_index: [kv_len] absolute position of each key.
    Returns:
      [batch, q_len, kv_len] bool (batch is 1 when nothing depends on it).
    """
    q_index = jnp.atleast_2d(q_index)
    mask = q_index[:, :, None] >= kv_index[None, None, :]
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return mask


def _xla(q, k, v, mask):
    """q: [b, t, h, d]; k, v: [b, s, kv, d]; mask: [b|1, t, s] -> [b, t, h, d]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def _cudnn(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")


@functools.cache
def _splash_kernel(q_len: int, kv_len: int, heads: int):
    """A causal splash-attention kernel over [heads, q_len, head_dim] (one batch row)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)
    mask = sm.MultiHeadMask([sm.CausalMask((q_len, kv_len))] * heads)
    return sk.make_splash_mha_single_device(mask)


def _splash(q, k, v, q_segment_ids, kv_segment_ids):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    b, t, h, d = q.shape
    group = h // k.shape[2]
    k = jnp.repeat(k, group, axis=2)
    v = jnp.repeat(v, group, axis=2)
    kernel = _splash_kernel(t, k.shape[1], h)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q * (d ** -0.5), k, v))
    if q_segment_ids is None:
        out = jax.vmap(kernel)(qt, kt, vt)
    else:
        seg = sk.SegmentIds(q=q_segment_ids, kv=kv_segment_ids)
        out = jax.vmap(kernel)(qt, kt, vt, segment_ids=seg)
    return out.transpose(0, 2, 1, 3)


def resolve_impl(impl: str) -> str:
    """Maps ``auto`` to the best implementation for the default backend."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    return {"gpu": "cudnn", "tpu": "splash"}.get(backend, "xla")


def attention(q, k, v, *, segment_ids=None, impl: str = "auto"):
    """Causal self-attention over a full sequence (training and prefill).

    Args:
      q: [batch, seq, heads, head_dim]
      k, v: [batch, seq, kv_heads, head_dim]; heads % kv_heads == 0 (grouped-query).
      segment_ids: [batch, seq] int document ids; tokens attend only within their document.
      impl: "auto", "xla", "cudnn" or "splash".
    Returns:
      [batch, seq, heads, head_dim] in q's dtype.
    """
    impl = resolve_impl(impl)
    if impl == "splash":
        return _splash(q, k, v, segment_ids, segment_ids).astype(q.dtype)
    index = jnp.arange(q.shape[1])
    mask = make_mask(segment_ids, segment_ids, index, index)
    if impl == "cudnn":
        return _cudnn(q, k, v, mask)
    if impl == "xla":
        return _xla(q, k, v, mask).astype(q.dtype)
    raise ValueError(f"unknown attention implementation {impl!r}: use auto, xla, cudnn or splash")


def attention_with_mask(q, k, v, mask):
    """Attention under an explicit mask (decoding against a KV cache).

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
      mask: [batch, q_len, kv_len] bool.
    Returns:
      [batch, q_len, heads, head_dim]
    """
    return _xla(q, k, v, mask).astype(q.dtype)
