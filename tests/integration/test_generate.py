"""KV-cache decoding against repeated full forward passes, sampling filters against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.commands import bench as bench_command
from lmjax.config import MeshConfig
from lmjax.inference import generate as gen
from lmjax.model import transformer
from lmjax.parallel import sharding
from tests.configs import SMALL_LM as CFG
from tests.unit import test_generate as fast_tier
from tests.unit.test_generate import (
    GEMMA3_CONFIG,
    LENGTHS,
    _forward,
    count_compiles,
    greedy_steps,
    prompts,
    window_model,
)

# The fast tier's module-scoped fixtures these tests share (pytest finds a fixture by the
# module attribute that holds it).
params = fast_tier.params


def greedy_by_full_forward(params, prompt, steps):
    """[steps] greedy tokens of one prompt, each from a full forward over all tokens so far
    (right-padded to one length, which causal attention ignores, to compile once)."""
    seq = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, len(prompt) + steps), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(_forward(params, padded, CFG)[0, len(seq) - 1])))
    return seq[len(prompt) :]


def test_greedy_with_cache_equals_repeated_full_forward(params):
    prompt = prompts(2, 6)
    out = np.asarray(gen.generate(params, CFG, prompt, max_new_tokens=12))
    assert out.shape == (2, 12) and out.dtype == np.int32
    for b in range(2):
        assert out[b].tolist() == greedy_by_full_forward(params, prompt[b].tolist(), 12)


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
    assert cache["global"]["k"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", None, "tensor"
    )


def test_bench_prints_a_table(capsys):
    result = bench_command.generation(CFG, batch=2, prompt_len=8, new_tokens=4)
    out = capsys.readouterr().out
    for word in ("prefill", "decode", "KV cache", "tokens/s"):
        assert word in out
    assert result["cache_bytes"] == 2 * CFG.n_layers * 2 * 12 * CFG.n_kv_heads * CFG.head_dim * 4
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0


def test_window_cache_generates_what_the_full_cache_does():
    """`generate`, greedy and sampled, token for token against local caches of max_len
    slots; greedy also against the step-by-step decoding that tests/unit/test_generate.py
    holds to numpy."""
    _, cfg, params, _, padded = window_model(GEMMA3_CONFIG)
    lengths = np.int32(LENGTHS)
    for sampling in (gen.Sampling(), gen.Sampling(temperature=1.5)):
        out = {}
        for window_cache in (True, False):
            logits, cache = gen.prefill_jit(
                params,
                padded,
                lengths,
                cfg=cfg,
                max_len=19,
                context=None,
                window_cache=window_cache,
            )
            out[window_cache] = np.asarray(
                gen.decode_jit(
                    params,
                    logits,
                    cache,
                    lengths,
                    np.int32(3),
                    cfg=cfg,
                    sampling=sampling,
                    eos_id=None,
                    max_new_tokens=8,
                    context=None,
                )[0]
            )
        np.testing.assert_array_equal(out[True], out[False])
    greedy = gen.generate(params, cfg, padded, max_new_tokens=8, prompt_lengths=LENGTHS)
    np.testing.assert_array_equal(np.asarray(greedy), greedy_steps(params, cfg, padded, 8)[0])
