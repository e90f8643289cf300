"""KV-cache decoding against repeated full forward passes, sampling filters against numpy."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.commands.experiment import load_experiment
from lmjax.convert import hf
from lmjax.inference import generate as gen
from lmjax.model import transformer
from tests import numpy_llama
from tests.configs import SMALL_LM as CFG
from tests.helpers import hamlet_tokenizer, random_model


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
    for kind, (layers, slots) in gen.cache_slots(cfg, 16).items():
        assert cache[kind]["k"].shape == (layers, 2, slots, cfg.n_kv_heads, cfg.head_dim)
    # Prefill attends over the prompt, the full forward over all 12 tokens: sums of other
    # lengths, float32 rounding apart (3e-5 on logits of ~20 in tests/integration/test_moe.py).
    np.testing.assert_allclose(logits, full[:, prompt_len - 1], atol=1e-4, rtol=1e-5)
    step = jax.jit(gen.decode_step, static_argnums=1)
    for pos in range(prompt_len, 12):
        logits, cache = step(params, cfg, jnp.asarray(seq[:, pos]), jnp.full((2,), pos), cache)
        np.testing.assert_allclose(logits, full[:, pos], atol=1e-4, rtol=1e-5)


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


# ---------------------------------------------------------------- window-sized cache

# A Gemma 3 (HF config.json) with two local layers of window 4 before a global one.
GEMMA3_CONFIG = {
    "model_type": "gemma3_text",
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0},
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 4,
    "sliding_window": 4,
    "sliding_window_pattern": 3,
    "tie_word_embeddings": True,
}
# A Mistral of the same shapes: every layer local (the scan without lax.cond).
MISTRAL_CONFIG = {
    **{k: GEMMA3_CONFIG[k] for k in ("vocab_size", "hidden_size", "intermediate_size")},
    **{k: GEMMA3_CONFIG[k] for k in ("num_hidden_layers", "num_attention_heads", "head_dim")},
    **{k: GEMMA3_CONFIG[k] for k in ("num_key_value_heads", "max_position_embeddings")},
    "model_type": "mistral",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "sliding_window": 4,
    "tie_word_embeddings": False,
}
# A Gemma 2 of the same shapes: local and global layers alternating, both soft caps.
GEMMA2_CONFIG = {
    **{k: v for k, v in GEMMA3_CONFIG.items() if k not in ("rope_local_base_freq",)},
    "model_type": "gemma2",
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attn_logit_softcapping": 2.0,
    "final_logit_softcapping": 5.0,
}
del GEMMA2_CONFIG["sliding_window_pattern"]
# Rows longer than the window (11, 7) and shorter (3), right-padded to 11.
LENGTHS = [11, 3, 7]


def window_model(config: dict):
    """(HF config, cfg, params, HF tensors of the same weights, padded prompts)."""
    cfg = dataclasses.replace(
        hf.config_from_hf(config), dtype="float32", attention="xla", remat="none"
    )
    shapes = transformer.param_shapes(cfg)  # normal(0.3) weights: distinct logits
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(
        tree, [jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32) for a in leaves]
    )
    padded = np.zeros((3, max(LENGTHS)), np.int32)
    for i, n in enumerate(LENGTHS):
        padded[i, :n] = np.random.default_rng(20 + i).integers(0, cfg.vocab_size, n)
    return config, cfg, params, hf.to_hf_tensors(cfg, params), padded


def greedy_steps(params, cfg, padded, new: int, window_cache: bool = True):
    """(greedy tokens [batch, new], each step's logits [new, batch, vocab], the prefill's
    cache): prefill, then one `decode_step` per token."""
    lengths = np.int32(LENGTHS)
    logits, cache = gen.prefill_jit(
        params,
        padded,
        lengths,
        cfg=cfg,
        max_len=padded.shape[1] + new,
        context=None,
        window_cache=window_cache,
    )
    first, steps, tokens = cache, [np.asarray(logits)], []
    for j in range(new):
        tokens.append(np.argmax(steps[-1], axis=-1).astype(np.int32))
        if j < new - 1:
            logits, cache = _decode_step(params, cfg, tokens[-1], lengths + j, cache)
            steps.append(np.asarray(logits))
    return np.stack(tokens, axis=1), np.stack(steps), first


_decode_step = jax.jit(gen.decode_step, static_argnums=1)


@pytest.mark.parametrize(
    "config,shapes",
    [
        (GEMMA3_CONFIG, {"local": (2, 3, 4, 2, 8), "global": (1, 3, 19, 2, 8)}),
        (GEMMA2_CONFIG, {"local": (2, 3, 4, 2, 8), "global": (1, 3, 19, 2, 8)}),
        (MISTRAL_CONFIG, {"local": (3, 3, 4, 2, 8)}),
    ],
)
def test_window_cache_decoding_matches_numpy_reference(config, shapes):
    """Greedy tokens and every step's logits, prefill and decode with window-sized local
    caches, equal the HF-convention numpy forward over each row's prompt and continuation."""
    _, cfg, params, tensors, padded = window_model(config)
    new = 8
    out, steps, cache = greedy_steps(params, cfg, padded, new)
    # A local layer keeps its window (4), a global one max_len (19).
    assert {kind: c["k"].shape for kind, c in cache.items()} == shapes
    for b, n in enumerate(LENGTHS):
        seq = np.concatenate([padded[b, :n], out[b]])[None]
        want = numpy_llama.forward(tensors, config, seq)[0, n - 1 : n - 1 + new]
        assert np.abs(want).max() > 1.0
        np.testing.assert_allclose(steps[:, b], want, atol=1e-4, rtol=0)
        assert out[b].tolist() == np.argmax(want, axis=-1).tolist()


def test_local_layers_cache_only_their_window():
    """Gemma 3 12B at a 32k context (bfloat16, batch 1): five of six layers keep 1024 slots."""
    cfg = load_experiment("gemma3_12b").model
    caches = {
        window: jax.eval_shape(lambda w=window: gen.init_cache(cfg, 1, 32768, window_cache=w))
        for window in (True, False)
    }
    assert caches[True]["local"]["k"].shape == (40, 1, 1024, 8, 256)
    assert caches[True]["global"]["k"].shape == (8, 1, 32768, 8, 256)
    assert caches[False]["local"]["k"].shape == (40, 1, 32768, 8, 256)
    size = {
        w: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(c)) for w, c in caches.items()
    }
    # k and v, 8 kv heads x 256 x 2 bytes: 8192 bytes per layer and slot.
    assert size == {False: 48 * 32768 * 8192, True: (8 * 32768 + 40 * 1024) * 8192}
