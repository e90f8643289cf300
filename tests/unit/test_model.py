"""Model numerics in float32 against the independent numpy reference (tests/numpy_llama.py).

Parameters are drawn as a random HF-named state dict and placed into the lmjax layout by
`tests.helpers.params_from_hf`, a direct transcription of the layouts documented in
lmjax/model/transformer.py (deliberately not lmjax.convert.hf, which tests/unit/test_convert.py
checks on its own).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.model import transformer
from tests import numpy_llama
from tests.configs import SMALL_LM
from tests.helpers import hf_config, random_model

# head_dim 16 with 4 heads over d_model 32: no projection may assume n_heads * head_dim ==
# d_model, and rope rotates 8 frequency pairs per head.
CFG = dataclasses.replace(SMALL_LM, head_dim=16)


# Llama-3.1 scaling with a short original context, so that all three frequency bands
# (kept, blended, divided by the factor) fall on frequencies that matter at 32 positions.
SCALED = dataclasses.replace(
    CFG,
    rope_scaling_factor=8.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=64,
)


def tokens_for(seed, batch=2, seq=32, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq))


def test_param_tree_matches_specs_and_init():
    params = jax.eval_shape(functools.partial(transformer.init, CFG), jax.random.key(0))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    expected = jax.tree.map(lambda s: (s.shape, s.dtype), transformer.param_shapes(CFG))
    assert shapes == expected
    assert transformer.count_params(CFG) == sum(x.size for x in jax.tree.leaves(params))
    assert jax.tree.structure(random_model(CFG)[0]) == jax.tree.structure(params)
    tied = dataclasses.replace(CFG, tie_embeddings=True)
    assert "unembed" not in jax.eval_shape(
        functools.partial(transformer.init, tied), jax.random.key(0)
    )


def test_rms_norm_matches_numpy(maybe_jit):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32) * 3
    w = rng.standard_normal(32).astype(np.float32)
    rms_norm = maybe_jit(transformer.rms_norm, static_argnums=2)
    got = rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5)
    np.testing.assert_allclose(
        np.asarray(got), numpy_llama.rms_norm(x.astype(np.float64), w, 1e-5), rtol=1e-5, atol=1e-6
    )
    # float32 weights do not promote bfloat16 activations
    assert rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w), 1e-5).dtype == jnp.bfloat16


def test_rope_frequencies_unscaled_match_numpy():
    got = np.asarray(transformer.rope_frequencies(CFG))
    np.testing.assert_allclose(got, numpy_llama.inverse_frequencies(hf_config(CFG)), rtol=1e-6)


def test_llama31_rope_scaling_matches_published_formula():
    cfg = dataclasses.replace(
        CFG,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling_factor=8.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_len=8192,
    )
    got = np.asarray(transformer.rope_frequencies(cfg), np.float64)
    inv = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    want = numpy_llama.llama3_scaled_frequencies(inv, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    # All three bands are exercised: kept, divided by the factor, and blended.
    kept = np.isclose(want, inv, rtol=1e-12)
    divided = np.isclose(want, inv / 8, rtol=1e-12)
    assert kept.any() and divided.any() and (~kept & ~divided).any()


def test_apply_rope_matches_numpy(maybe_jit):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)
    pos = np.stack([np.arange(7), np.array([0, 1, 2, 0, 1, 5, 40])])
    sin, cos = maybe_jit(transformer.rope_tables, static_argnums=1)(jnp.asarray(pos), SCALED)
    got = np.asarray(maybe_jit(transformer.apply_rope)(jnp.asarray(x), sin, cos))
    inv = numpy_llama.inverse_frequencies(hf_config(SCALED))
    want = np.stack(
        [numpy_llama.apply_rope(x[b].astype(np.float64), pos[b], inv) for b in range(2)]
    )
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("cfg", [CFG, SCALED], ids=["plain", "llama31"])
def test_rope_scores_depend_only_on_relative_position(cfg):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

    def score(m, n):
        sq, cq = transformer.rope_tables(jnp.array([[m]]), cfg)
        sk, ck = transformer.rope_tables(jnp.array([[n]]), cfg)
        return float(jnp.sum(transformer.apply_rope(q, sq, cq) * transformer.apply_rope(k, sk, ck)))

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        base = score(m, n)
        for shift in (1, 7, 20):
            assert score(m + shift, n + shift) == pytest.approx(base, abs=1e-4)
    # ... and does depend on it.
    assert abs(score(5, 2) - score(6, 2)) > 1e-3
    # Rotation preserves norms; position 0 is the identity.
    s, c = transformer.rope_tables(jnp.array([[37]]), cfg)
    assert float(jnp.linalg.norm(transformer.apply_rope(q, s, c))) == pytest.approx(
        float(jnp.linalg.norm(q)), rel=1e-6
    )
    s, c = transformer.rope_tables(jnp.array([[0]]), cfg)
    np.testing.assert_allclose(
        np.asarray(transformer.apply_rope(q, s, c)), np.asarray(q), atol=1e-7
    )


@pytest.mark.parametrize(
    "cfg,maybe_jit",
    [
        (CFG, "jit"),
        (dataclasses.replace(CFG, tie_embeddings=True), "jit"),
        (dataclasses.replace(CFG, n_kv_heads=1), "jit"),
        (dataclasses.replace(CFG, n_kv_heads=4, head_dim=8), "jit"),
        (SCALED, "jit"),
        (SCALED, "eager"),  # one eager run: the scan over layers as a Python loop
    ],
    ids=["gqa-untied", "gqa-tied", "mqa", "mha", "llama31-rope", "llama31-rope-eager"],
    indirect=["maybe_jit"],
)
def test_forward_matches_numpy_reference(cfg, maybe_jit):
    params, tensors = random_model(cfg, seed=3)
    tokens = tokens_for(4)
    forward = maybe_jit(transformer.forward, static_argnums=2)
    got = np.asarray(forward(params, jnp.asarray(tokens), cfg))
    want = numpy_llama.forward(tensors, hf_config(cfg), tokens)
    assert np.abs(want).max() > 1.0  # logits carry signal, so 1e-4 is a real bound
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def packed_batch():
    """Row 0: documents of 5, 9 and 18 tokens; row 1: one 20-token document then padding (0)."""
    lengths = [[5, 9, 18], [20, 12]]
    seg = np.array([np.repeat(np.arange(1, len(l) + 1), l) for l in lengths])
    seg[1, 20:] = 0
    pos = np.array([np.concatenate([np.arange(n) for n in l]) for l in lengths])
    return tokens_for(5), seg, pos, lengths


def test_packed_forward_matches_numpy_reference(maybe_jit):
    params, tensors = random_model(CFG, seed=6)
    tokens, seg, pos, _ = packed_batch()
    forward = maybe_jit(transformer.forward, static_argnums=2)
    got = forward(
        params, jnp.asarray(tokens), CFG, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)
    )
    want = numpy_llama.forward(tensors, hf_config(CFG), tokens, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_changing_one_document_leaves_the_others_unchanged():
    params, _ = random_model(CFG, seed=8)
    tokens, seg, pos, _ = packed_batch()
    fwd = jax.jit(
        lambda t: transformer.forward(
            params, t, CFG, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos)
        )
    )
    before = np.asarray(fwd(jnp.asarray(tokens)))
    changed = tokens.copy()
    changed[0, 5:14] = (changed[0, 5:14] + 1) % CFG.vocab_size  # the middle document of row 0
    after = np.asarray(fwd(jnp.asarray(changed)))
    diff = np.abs(after - before).max(axis=-1)
    assert (diff[0, 5:14] > 1e-3).all()
    np.testing.assert_allclose(after[0, :5], before[0, :5], atol=1e-6, rtol=0)
    np.testing.assert_allclose(after[0, 14:], before[0, 14:], atol=1e-6, rtol=0)
    np.testing.assert_allclose(after[1], before[1], atol=1e-6, rtol=0)


def test_future_tokens_do_not_change_past_logits():
    params, _ = random_model(CFG, seed=9)
    tokens = tokens_for(10)
    fwd = jax.jit(lambda t: transformer.forward(params, t, CFG))
    before = np.asarray(fwd(jnp.asarray(tokens)))
    changed = tokens.copy()
    changed[:, 20:] = (changed[:, 20:] + 7) % CFG.vocab_size
    after = np.asarray(fwd(jnp.asarray(changed)))
    np.testing.assert_allclose(after[:, :20], before[:, :20], atol=1e-6, rtol=0)
    assert (np.abs(after[:, 20:] - before[:, 20:]).max(axis=-1) > 1e-3).all()


def test_scan_layers_forward_equals_python_loop():
    params, _ = random_model(SCALED, seed=13)
    tokens = jnp.asarray(tokens_for(14))
    a = transformer.forward(params, tokens, SCALED)
    b = transformer.forward(params, tokens, dataclasses.replace(SCALED, scan_layers=False))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
