"""KV-cache decoding against repeated full forward passes, sampling filters against numpy."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.inference import generate as gen
from lmjax.model import transformer
from tests.helpers import SMALL_LM as CFG, hamlet_tokenizer, random_model


@pytest.fixture(scope="module")
def params():
    return random_model(CFG, seed=0)[0]


def prompts(batch, length, seed=0):
    return np.random.default_rng(seed).integers(4, CFG.vocab_size, (batch, length))


_forward = jax.jit(transformer.forward, static_argnums=2)


@contextlib.contextmanager
def count_compiles():
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def check_cached_steps(params, cfg):
    """Prefill of 4 tokens, then one-token steps to 12: each step's logits equal the full
    forward's at that position."""
    seq = prompts(2, 12, seed=1)
    prompt_len = 4
    full = np.asarray(_forward(params, jnp.asarray(seq), cfg))  # [2, 12, vocab]
    lengths = jnp.full((2,), prompt_len)
    prefill = jax.jit(gen.prefill, static_argnums=(1, 4))
    logits, cache = prefill(params, cfg, jnp.asarray(seq[:, :prompt_len]), lengths, 16)
    assert cache["k"].shape == (cfg.n_layers, 2, 16, cfg.n_kv_heads, cfg.head_dim)
    np.testing.assert_allclose(logits, full[:, prompt_len - 1], atol=1e-5, rtol=1e-5)
    step = jax.jit(gen.decode_step, static_argnums=1)
    for pos in range(prompt_len, 12):
        logits, cache = step(params, cfg, jnp.asarray(seq[:, pos]), jnp.full((2,), pos), cache)
        np.testing.assert_allclose(logits, full[:, pos], atol=1e-5, rtol=1e-5)


def test_logits_of_each_cached_step_match_full_forward(params):
    check_cached_steps(params, CFG)


def test_rows_stop_at_eos_and_are_filled_with_it(params):
    prompt = prompts(2, 6, seed=2)
    free = np.asarray(gen.generate(params, CFG, prompt, max_new_tokens=12))
    eos = int(free[0, 3])  # row 0 emits it at step 3 (or earlier)
    first = int(np.flatnonzero(free[0] == eos)[0])
    out = np.asarray(gen.generate(params, CFG, prompt, max_new_tokens=12, eos_id=eos))
    for b in range(2):
        hits = np.flatnonzero(free[b] == eos)
        stop = int(hits[0]) if hits.size else 12
        assert out[b, : stop + 1].tolist() == free[b, : stop + 1].tolist()
        assert (out[b, stop:] == eos).all()
    assert first <= 3 and (out[0, first:] == eos).all()


def test_top_k_filter_keeps_exactly_the_k_largest():
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    for k in (1, 5, 50):
        kept = np.isfinite(np.asarray(gen.top_k_filter(jnp.asarray(logits), k)))
        for row, keep in zip(logits, kept):
            assert set(np.flatnonzero(keep)) == set(np.argsort(-row)[:k])
        filtered = np.asarray(gen.top_k_filter(jnp.asarray(logits), k))
        np.testing.assert_array_equal(filtered[kept], logits[kept])


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    logits = np.random.default_rng(1).normal(scale=2.0, size=(3, 40)).astype(np.float32)
    for row in logits:
        order = np.argsort(-row)
        probs = np.exp(row[order].astype(np.float64) - row.max())
        cum = np.cumsum(probs / probs.sum())
        # p halfway between consecutive cumulative sums: the answer is unambiguous.
        for n_keep in (1, 2, 5, 17, 40):
            p = (cum[n_keep - 2] + cum[n_keep - 1]) / 2 if n_keep > 1 else cum[0] / 2
            kept = np.isfinite(np.asarray(gen.top_p_filter(jnp.asarray(row), float(p))))
            assert set(np.flatnonzero(kept)) == set(order[:n_keep]), (n_keep, p)


def test_sampling_is_seeded_and_respects_top_k(params):
    prompt = prompts(2, 6, seed=5)
    kw = dict(max_new_tokens=12, temperature=1.5)
    a = np.asarray(gen.generate(params, CFG, prompt, seed=1, **kw))
    b = np.asarray(gen.generate(params, CFG, prompt, seed=1, **kw))
    c = np.asarray(gen.generate(params, CFG, prompt, seed=2, **kw))
    assert (a == b).all() and (a != c).any()
    assert (a[0] != a[1]).any()
    # top_k=1 is greedy whatever the temperature.
    greedy = np.asarray(gen.generate(params, CFG, prompt, max_new_tokens=12))
    top1 = np.asarray(gen.generate(params, CFG, prompt, seed=3, top_k=1, **kw))
    np.testing.assert_array_equal(top1, greedy)


def test_bad_arguments_fail_before_compiling(params):
    prompt = prompts(2, 4)
    cases = [
        (dict(prompt_tokens=prompt, max_new_tokens=61), "max_seq_len"),
        (dict(prompt_tokens=prompt[0], max_new_tokens=4), r"\[batch, prompt_len\]"),
        (dict(prompt_tokens=prompt + 400, max_new_tokens=4), "vocab_size"),
        (dict(prompt_tokens=prompt, max_new_tokens=4, prompt_lengths=[4, 0]), "prompt_lengths"),
        (dict(prompt_tokens=prompt, max_new_tokens=4, temperature=1.0, top_k=0), "top_k"),
        (dict(prompt_tokens=prompt, max_new_tokens=4, temperature=1.0, top_p=1.5), "top_p"),
        (dict(prompt_tokens=prompt, max_new_tokens=0), "max_new_tokens"),
    ]
    for kw, message in cases:
        with count_compiles() as compiles, pytest.raises(ValueError, match=message):
            gen.generate(params, CFG, **kw)
        assert compiles == []


def test_sample_text_continues_the_prompt(params, tokenizer):
    prompt = "To be, or not to be"
    text = gen.sample_text(params, CFG, tokenizer, prompt, 12)
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    new = np.asarray(
        gen.generate(params, CFG, np.asarray([ids]), max_new_tokens=12, eos_id=tokenizer.eos_id)
    )[0].tolist()
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    assert text.startswith(prompt)
    assert tokenizer.encode(text) == tokenizer.encode(tokenizer.decode(ids[1:] + new))
    assert text == gen.sample_text(params, CFG, tokenizer, prompt, 12)


@pytest.mark.parametrize("bos_id", [2, -1])
def test_a_prompt_is_fed_after_bos_when_the_tokenizer_has_one(params, bos_id):
    """A prompt is a document that continues: BOS (bos_id -1: a tokenizer trained without
    one gets none), its tokens, no EOS; the text returned is the prompt and its continuation."""
    tok = hamlet_tokenizer(bos_id)
    prompt = "To be, or not to be"
    fed = [bos_id] * (bos_id >= 0) + tok.encode(prompt)
    assert tok.encode_documents([prompt], eos=False) == [fed]
    text = gen.sample_text(params, CFG, tok, prompt, 6)
    new = np.asarray(
        gen.generate(params, CFG, np.asarray([fed]), max_new_tokens=6, eos_id=tok.eos_id)
    )[0].tolist()
    new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
    assert text == tok.decode(tok.encode(prompt) + new)
