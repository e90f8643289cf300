"""KV-cache decoding against repeated full forward passes, sampling filters against numpy."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.commands import bench as bench_command
from lmjax.config import MeshConfig
from lmjax.inference import generate as gen
from lmjax.model import transformer
from lmjax.parallel import sharding
from tests.helpers import SMALL_LM as CFG, hamlet_tokenizer, random_model


@pytest.fixture(scope="module")
def params():
    return random_model(CFG, seed=0)[0]


def prompts(batch, length, seed=0):
    return np.random.default_rng(seed).integers(4, CFG.vocab_size, (batch, length))


_forward = jax.jit(transformer.forward, static_argnums=2)


def greedy_by_full_forward(params, prompt, steps):
    """[steps] greedy tokens of one prompt, each from a full forward over all tokens so far
    (right-padded to one length, which causal attention ignores, to compile once)."""
    seq = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, len(prompt) + steps), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(_forward(params, padded, CFG)[0, len(seq) - 1])))
    return seq[len(prompt) :]


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


# ---------------------------------------------------------------- cache vs full forward


@pytest.mark.slow
def test_greedy_with_cache_equals_repeated_full_forward(params):
    prompt = prompts(2, 6)
    out = np.asarray(gen.generate(params, CFG, prompt, max_new_tokens=12))
    assert out.shape == (2, 12) and out.dtype == np.int32
    for b in range(2):
        assert out[b].tolist() == greedy_by_full_forward(params, prompt[b].tolist(), 12)


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


# Every model-family switch at once (tests/test_families.py holds the forward against HF's
# conventions): a local layer with a window of 3 and its own RoPE base, then a global one.
FAMILY_LM = dataclasses.replace(
    CFG,
    sliding_window=3,
    global_every=2,
    rope_local_theta=500.0,
    qkv_bias=True,
    qk_norm=True,
    norm_offset=True,
    scale_embeddings=True,
    mlp_activation="gelu_tanh",
    post_norms=True,
    attn_softcap=2.0,
    final_softcap=5.0,
    query_pre_attn_scalar=4.0,
)


@pytest.mark.slow
def test_cached_steps_of_a_sliding_window_model_match_full_forward():
    """The cache of a local layer is read only within its window, in prefill and decoding."""
    params = transformer.init(FAMILY_LM, jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)  # non-zero biases and norm weights
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noise = [0.2 * jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves)]
    check_cached_steps(jax.tree.unflatten(tree, [a + b for a, b in zip(leaves, noise)]), FAMILY_LM)


@pytest.mark.slow
def test_mixed_length_batch_gives_each_prompt_its_solo_output(params):
    lengths = [2, 6, 2]
    rows = [prompts(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    padded = np.zeros((3, 6), np.int64)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    batch = np.asarray(gen.generate(params, CFG, padded, max_new_tokens=12, prompt_lengths=lengths))
    for i, row in enumerate(rows):
        alone = np.asarray(gen.generate(params, CFG, row[None], max_new_tokens=12))[0]
        assert batch[i].tolist() == alone.tolist()
    # Sampling: row 0 uses the same keys alone and in a batch.
    kw = dict(max_new_tokens=12, temperature=1.5, seed=4)
    sampled = np.asarray(gen.generate(params, CFG, padded, prompt_lengths=lengths, **kw))
    alone = np.asarray(gen.generate(params, CFG, rows[0][None], **kw))
    assert sampled[0].tolist() == alone[0].tolist()


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


# ---------------------------------------------------------------- compiles


@pytest.mark.slow
def test_no_compile_per_token(params):
    prompt = prompts(2, 5, seed=3)
    with count_compiles() as short:
        gen.generate(params, CFG, prompt, max_new_tokens=3)
    with count_compiles() as long:
        gen.generate(params, CFG, prompt, max_new_tokens=30)
    assert len(short) > 0
    assert len(long) == len(short)  # ten times the tokens, the same number of compiles
    with count_compiles() as again:
        gen.generate(
            params, CFG, prompts(2, 5, seed=4), max_new_tokens=30, seed=9, prompt_lengths=[5, 2]
        )
        gen.generate(params, CFG, prompt, max_new_tokens=30, temperature=0.0, eos_id=None)
    assert again == []


# ---------------------------------------------------------------- sampling


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


# ---------------------------------------------------------------- sharded


@pytest.mark.slow
def test_sharded_generation_matches_unsharded(params):
    mesh_cfg = MeshConfig(data=1, fsdp=4, tensor=2)
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.rules_from_config(mesh_cfg)
    placed = jax.device_put(
        params, sharding.tree_shardings(transformer.param_axes(CFG), mesh, rules)
    )
    assert not placed["layers"]["wq"].sharding.is_fully_replicated
    prompt, lengths = prompts(4, 6, seed=6), [6, 3, 5, 1]
    plain = np.asarray(gen.generate(params, CFG, prompt, max_new_tokens=8, prompt_lengths=lengths))
    with sharding.activation_sharding(mesh, rules):
        out = gen.generate(placed, CFG, prompt, max_new_tokens=8, prompt_lengths=lengths)
        logits, cache = gen.prefill_jit(
            placed,
            prompt.astype(np.int32),
            np.asarray(lengths, np.int32),
            cfg=CFG,
            max_len=14,
            context=sharding.context_key(),
        )
    np.testing.assert_array_equal(np.asarray(out), plain)
    # The cache follows the rules: batch over fsdp, kv heads over tensor.
    assert cache["k"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")


# ---------------------------------------------------------------- text and bench


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


@pytest.mark.slow
def test_bench_prints_a_table(capsys):
    result = bench_command.generation(CFG, batch=2, prompt_len=8, new_tokens=4)
    out = capsys.readouterr().out
    for word in ("prefill", "decode", "KV cache", "tokens/s"):
        assert word in out
    assert result["cache_bytes"] == 2 * CFG.n_layers * 2 * 12 * CFG.n_kv_heads * CFG.head_dim * 4
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


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
