"""Attention numerics (float32): masks, grouped-query and multi-query against references."""

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.model import attention as attn_lib
from tests.unit.test_attention import _qkv, _reference


def test_splash_kernel_with_local_mask_and_soft_cap_matches_xla_with_gradients():
    """The TPU kernel (Pallas interpreter) with a window of 100 over 256 tokens in blocks of
    128 (a key block wholly outside the window), documents, scale and soft cap: values
    and gradients of q, k and v against the XLA path."""
    spec = attn_lib.Scores(scale=0.3, softcap=0.8, window=100)
    q, k, v = (jnp.asarray(x) for x in _qkv(12, batch=1, seq=256, heads=2, kv_heads=1))
    seg = jnp.asarray(np.repeat([[1, 2]], [200, 56], axis=1))

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) ** 2)

    def kernel(q, k, v):
        return attn_lib._splash_local(q, k, v, seg, spec, interpret=True)

    def xla(q, k, v):
        return attn_lib.attention(q, k, v, segment_ids=seg, impl="xla", spec=spec)

    np.testing.assert_allclose(
        np.asarray(jax.jit(kernel)(q, k, v)),
        _reference(*map(np.asarray, (q, k, v)), np.asarray(seg), spec),
        atol=1e-5,
        rtol=1e-5,
    )
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4, rtol=1e-4)


def test_block_causal_path_matches_numpy_loop_with_documents_across_blocks():
    """seq 384 = 3 query blocks of 128: the path that skips key blocks above the diagonal."""
    seq = 3 * attn_lib.XLA_BLOCK
    q, k, v = _qkv(7, batch=2, seq=seq, heads=4, kv_heads=2, head_dim=4)
    seg = np.ones((2, seq), np.int32)
    seg[0, 100:300] = 2  # a document that spans the first block boundaries
    seg[0, 300:] = 3
    out = attn_lib.attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), segment_ids=jnp.asarray(seg), impl="xla"
    )
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, seg), atol=1e-5, rtol=1e-5)
    grads = jax.grad(
        lambda q: attn_lib.attention(q, jnp.asarray(k), jnp.asarray(v), impl="xla").sum()
    )(jnp.asarray(q))
    index = jnp.arange(seq)
    full = jax.grad(
        lambda q: attn_lib.attention_with_mask(
            q, jnp.asarray(k), jnp.asarray(v), attn_lib.make_mask(None, None, index, index)
        ).sum()
    )(jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(grads), np.asarray(full), atol=1e-5, rtol=1e-5)
