"""KV-cache decoding against repeated full forward passes, sampling filters against numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.commands import bench as bench_command
from lmjax.config import MeshConfig
from lmjax.inference import generate as gen
from lmjax.model import transformer
from lmjax.parallel import sharding
from tests.helpers import SMALL_LM as CFG
from tests.unit import test_generate as fast_tier
from tests.unit.test_generate import _forward, check_cached_steps, count_compiles, prompts

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


# Every model-family switch at once (tests/unit/test_families.py holds the forward against HF's
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


def test_cached_steps_of_a_sliding_window_model_match_full_forward():
    """The cache of a local layer is read only within its window, in prefill and decoding."""
    params = transformer.init(FAMILY_LM, jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)  # non-zero biases and norm weights
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noise = [0.2 * jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves)]
    check_cached_steps(jax.tree.unflatten(tree, [a + b for a, b in zip(leaves, noise)]), FAMILY_LM)


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
    assert cache["k"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor")


def test_bench_prints_a_table(capsys):
    result = bench_command.generation(CFG, batch=2, prompt_len=8, new_tokens=4)
    out = capsys.readouterr().out
    for word in ("prefill", "decode", "KV cache", "tokens/s"):
        assert word in out
    assert result["cache_bytes"] == 2 * CFG.n_layers * 2 * 12 * CFG.n_kv_heads * CFG.head_dim * 4
    assert result["prefill_tokens_per_s"] > 0 and result["decode_tokens_per_s"] > 0
