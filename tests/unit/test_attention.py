"""Attention numerics (float32): masks, grouped-query and multi-query against references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.model import attention as attn_lib
from tests import numpy_llama


def _qkv(seed, batch=2, seq=12, heads=4, kv_heads=2, head_dim=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32)
    return q, k, v


def _reference(q, k, v, segment_ids=None, spec=attn_lib.PLAIN):
    """The numpy loop of tests/numpy_llama.py, row by row, with `spec`'s window, scale and
    soft cap. Returns [batch, seq, heads, head_dim]."""
    seq = q.shape[1]
    out = []
    for b in range(q.shape[0]):
        allowed = np.tril(np.ones((seq, seq), bool))
        if spec.window:
            allowed &= np.subtract.outer(np.arange(seq), np.arange(seq)) < spec.window
        if segment_ids is not None:
            allowed &= segment_ids[b][:, None] == segment_ids[b][None, :]
        out.append(
            numpy_llama.attention(
                *(x[b].astype(np.float64) for x in (q, k, v)), allowed, spec.scale, spec.softcap
            )
        )
    return np.stack(out)


SPEC = attn_lib.Scores(scale=0.3, softcap=0.8, window=5)


def test_window_scale_and_soft_cap_match_numpy_loop(monkeypatch, maybe_jit):
    """The XLA path, whole and in query blocks of 4 that skip the key blocks wholly before
    the window (XLA_BLOCK shrunk so that 16 tokens make 4 blocks), and the decoding path;
    jitted and eager."""
    q, k, v = _qkv(11, seq=16)
    seg = np.repeat([[1, 2]], [10, 6], axis=1).repeat(2, 0)
    want = _reference(q, k, v, seg, SPEC)
    args = [jnp.asarray(x) for x in (q, k, v, seg)]

    def causal(q, k, v, seg):
        return attn_lib.attention(q, k, v, segment_ids=seg, impl="xla", spec=SPEC)

    def cached(q, k, v, seg):
        mask = attn_lib.make_mask(seg, seg, jnp.arange(16), jnp.arange(16), SPEC.window)
        return attn_lib.attention_with_mask(q, k, v, mask, SPEC)

    for fn in (causal, cached):
        np.testing.assert_allclose(np.asarray(maybe_jit(fn)(*args)), want, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(attn_lib, "XLA_BLOCK", 4)
    blocks = maybe_jit(causal)(*args)
    np.testing.assert_allclose(np.asarray(blocks), want, atol=1e-5, rtol=1e-5)


def test_auto_keeps_the_gpu_and_tpu_kernels_for_windows_and_soft_caps_and_cudnn_refuses():
    for backend, kernel in (("gpu", "pallas_gpu"), ("tpu", "splash")):
        assert attn_lib.resolve_impl("auto", backend, seq_len=1024) == kernel
    q, k, v = (jnp.asarray(x) for x in _qkv(13, seq=16))
    with pytest.raises(ValueError, match="cudnn implements no attention soft-capping"):
        attn_lib.attention(q, k, v, impl="cudnn", spec=attn_lib.Scores(softcap=1.0))


def test_make_mask_is_causal_and_block_diagonal():
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    idx = jnp.arange(6)
    mask = np.asarray(attn_lib.make_mask(seg, seg, idx, idx))[0]
    expected = np.zeros((6, 6), bool)
    for i in range(6):
        for j in range(i + 1):
            expected[i, j] = int(seg[0, i]) == int(seg[0, j])
    np.testing.assert_array_equal(mask, expected)
    unsegmented = np.asarray(attn_lib.make_mask(None, None, idx, idx))[0]
    np.testing.assert_array_equal(unsegmented, np.tril(np.ones((6, 6), bool)))


@pytest.mark.parametrize(
    "heads,kv_heads,maybe_jit",
    [(4, 4, "jit"), (4, 2, "jit"), (6, 1, "jit"), (6, 1, "eager")],  # eager: the widest grouping
    ids=["mha", "gqa", "mqa", "mqa-eager"],
    indirect=["maybe_jit"],
)
def test_attention_matches_numpy_loop(heads, kv_heads, maybe_jit):
    q, k, v = _qkv(0, heads=heads, kv_heads=kv_heads)
    attention = maybe_jit(functools.partial(attn_lib.attention, impl="xla"))
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(np.asarray(out), _reference(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_grouped_query_equals_mha_with_repeated_kv(kv_heads):
    heads = 4
    q, k, v = _qkv(1, heads=heads, kv_heads=kv_heads)
    group = heads // kv_heads
    seg = np.array([[0] * 5 + [1] * 7, [3] * 12])
    grouped = attn_lib.attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), segment_ids=jnp.asarray(seg), impl="xla"
    )
    k_rep, v_rep = (np.repeat(x, group, axis=2) for x in (k, v))
    full = attn_lib.attention(
        jnp.asarray(q),
        jnp.asarray(k_rep),
        jnp.asarray(v_rep),
        segment_ids=jnp.asarray(seg),
        impl="xla",
    )
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(full), atol=1e-6, rtol=1e-6)


def test_segments_match_numpy_loop_and_do_not_leak():
    q, k, v = _qkv(2)
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], [5] * 6 + [6] * 6])
    out = np.asarray(
        attn_lib.attention(
            jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), segment_ids=jnp.asarray(seg), impl="xla"
        )
    )
    np.testing.assert_allclose(out, _reference(q, k, v, seg), atol=1e-5, rtol=1e-5)
    # Replacing the keys/values of document 2 (row 0, positions 4..6) changes only document 2.
    k2, v2 = k.copy(), v.copy()
    k2[0, 4:7] += 3.0
    v2[0, 4:7] -= 3.0
    out2 = np.asarray(
        attn_lib.attention(
            jnp.asarray(q),
            jnp.asarray(k2),
            jnp.asarray(v2),
            segment_ids=jnp.asarray(seg),
            impl="xla",
        )
    )
    changed = np.abs(out2 - out).max(axis=(2, 3)) > 1e-6
    expected = np.zeros_like(changed)
    expected[0, 4:7] = True
    np.testing.assert_array_equal(changed, expected)


def test_future_keys_do_not_change_past_outputs():
    q, k, v = _qkv(3)
    out = np.asarray(attn_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla"))
    k2, v2 = k.copy(), v.copy()
    k2[:, 7:] = 10.0
    v2[:, 7:] = -10.0
    out2 = np.asarray(
        attn_lib.attention(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), impl="xla")
    )
    np.testing.assert_array_equal(out[:, :7], out2[:, :7])
    assert np.abs(out[:, 7:] - out2[:, 7:]).min() > 0


def test_attention_with_mask_equals_causal_attention():
    q, k, v = _qkv(4, kv_heads=1)
    seq = q.shape[1]
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (q.shape[0], seq, seq))
    a = attn_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla")
    b = attn_lib.attention_with_mask(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-6)


def test_auto_resolves_by_backend_and_unknown_impl_is_refused():
    assert jax.default_backend() == "cpu"
    assert attn_lib.resolve_impl("auto") == "xla"
    assert attn_lib.resolve_impl("auto", "gpu") == "pallas_gpu"
    assert attn_lib.resolve_impl("auto", "tpu") == "splash"
    assert attn_lib.resolve_impl("cudnn", "tpu") == "cudnn"
    # a length the kernel's blocks do not divide (a scoring window, a prompt) falls back to xla
    assert attn_lib.resolve_impl("auto", "gpu", seq_len=1000) == "xla"
    assert attn_lib.resolve_impl("auto", "gpu", seq_len=1024) == "pallas_gpu"
    assert attn_lib.resolve_impl("auto", "tpu", seq_len=200) == "xla"
    q, k, v = (jnp.asarray(x) for x in _qkv(5))
    with pytest.raises(ValueError, match="use one of .*pallas_gpu"):
        attn_lib.attention(q, k, v, impl="flash")


def test_cudnn_refuses_what_its_kernel_cannot_do_and_names_the_fix():
    """cuDNN attention is bf16/f16 only and takes no segment ids: an error, not a T x T mask."""
    q, k, v = (jnp.asarray(x) for x in _qkv(6))
    with pytest.raises(ValueError, match="bfloat16/float16 .* model.attention=pallas_gpu"):
        attn_lib.attention(q, k, v, impl="cudnn")
    seg = jnp.ones(q.shape[:2], jnp.int32)
    with pytest.raises(ValueError, match="no packed documents"):
        attn_lib.attention(
            *(x.astype(jnp.bfloat16) for x in (q, k, v)), segment_ids=seg, impl="cudnn"
        )
