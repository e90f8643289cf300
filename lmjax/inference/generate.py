"""Autoregressive decoding with a key/value cache: prefill, one-token steps, sampling.

Conventions:
  * Prompts are int ids [batch, prompt_len], right-padded when `prompt_lengths` is given;
    nothing is prepended (`sample_text` adds the tokenizer's BOS).
  * The cache holds keys and values of the kv heads (grouped-query attention), each
    [layers, batch, max_len, kv_heads, head_dim] with max_len = prompt_len + max_new_tokens.
    Cache slot i holds the token at position i; a token at position p attends to slots
    0..p, so padding written past a short prompt is never read and is overwritten by its
    continuation; a local (sliding-window) layer reads only the last `sliding_window` slots
    up to p.
  * The prompt is prefilled in one jitted call; the new tokens come from one jitted
    `lax.while_loop` of one-token steps over the fixed-size cache (no per-token compiles).
    Both attend through `attention.attention_with_mask` (the XLA path) over the whole
    cache, whatever `model.attention` selects for training.
  * After a row emits `eos_id` the rest of its row is `eos_id` (the eos token itself is the
    pad); the loop stops when every row has finished or after `max_new_tokens`.
  * Sampling: temperature 0 is greedy (argmax). Otherwise logits / temperature, then
    top-k, then top-p filtering, then a categorical draw with key
    fold_in(fold_in(PRNGKey(seed), row), step): a row's samples depend on the seed and its
    row index, so repeating a prompt in a batch gives different samples. Greedy decoding of
    a row does not depend on the other rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import ConfigError, ModelConfig
from lmjax.model import attention as attn_lib, transformer
from lmjax.parallel import sharding

Cache = dict[str, jax.Array]  # "k", "v": [layers, batch, max_len, kv_heads, head_dim]
CACHE_AXES = (None, "act_batch", "act_seq", "act_kv_heads", None)


# ---------------------------------------------------------------- cached forward


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> Cache:
    """Zeroed keys and values, each [layers, batch, max_len, kv_heads, head_dim], cfg.dtype."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    return {"k": sharding.constrain(zeros, CACHE_AXES), "v": sharding.constrain(zeros, CACHE_AXES)}


def extend(params, cfg: ModelConfig, tokens, positions, cache: Cache):
    """Runs new tokens through the decoder against the cache.

    Each token's key and value are written to the cache slot of its position; it then
    attends to every slot at or before its position.

    Args:
      tokens: [batch, t] int ids; positions: [batch, t] int positions (cache slots).
      cache: from `init_cache`, max_len > every position.
    Returns:
      (hidden states before the final norm [batch, t, embed], updated cache).
    """
    x = transformer.embed(params, tokens, cfg)
    slots = jnp.arange(cache["k"].shape[2])
    rows = jnp.arange(tokens.shape[0])[:, None]

    def layer_step(x, xs, local: bool):
        layer, k_cache, v_cache = xs
        spec = transformer.scores_spec(cfg, local)
        mask = attn_lib.make_mask(None, None, positions, slots, spec.window)

        def attend(q, k, v):
            k_all = k_cache.at[rows, positions].set(k.astype(k_cache.dtype))
            v_all = v_cache.at[rows, positions].set(v.astype(v_cache.dtype))
            return attn_lib.attention_with_mask(q, k_all, v_all, mask, spec), (k_all, v_all)

        sin, cos = transformer.rope_tables(positions, cfg, local)
        return transformer.decoder_layer(x, layer, sin, cos, attend, cfg)[:2]

    ks, vs = [], []
    for start, end, stack in transformer.run_stacks(params, cfg):
        xs = (stack, cache["k"][start:end], cache["v"][start:end])
        x, (k, v) = transformer.scan_layers(layer_step, x, xs, cfg, layers=range(start, end))
        ks.append(k)
        vs.append(v)
    k, v = jnp.concatenate(ks), jnp.concatenate(vs)
    return x, {"k": sharding.constrain(k, CACHE_AXES), "v": sharding.constrain(v, CACHE_AXES)}


def prefill(params, cfg: ModelConfig, tokens, lengths, max_len: int):
    """Fills a fresh cache with right-padded prompts.

    Args:
      tokens: [batch, prompt_len] int ids; lengths: [batch] int true prompt lengths (>= 1).
      max_len: cache length (>= prompt_len).
    Returns:
      (float32 next-token logits at each prompt's last token [batch, vocab], cache).
    """
    batch, prompt_len = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    hidden, cache = extend(params, cfg, tokens, positions, init_cache(cfg, batch, max_len))
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return transformer.unembed(params, last, cfg)[:, 0], cache


def decode_step(params, cfg: ModelConfig, tokens, positions, cache: Cache):
    """One token per row. tokens, positions: [batch] int -> (logits [batch, vocab], cache)."""
    hidden, cache = extend(params, cfg, tokens[:, None], positions[:, None], cache)
    return transformer.unembed(params, hidden, cfg)[:, 0], cache


# ---------------------------------------------------------------- sampling


def top_k_filter(logits, k: int):
    """Keeps the logits at least as large as the k-th largest, others -inf.

    logits: [..., vocab] -> same shape (ties with the k-th value are kept).
    """
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits, p: float):
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability
    reaches p (always at least the most likely one), others -inf.

    A token is kept when the probability of the tokens strictly more likely than it is
    below p. logits: [..., vocab] -> same shape (ties with the last kept value are kept).
    """
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(before < p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self, vocab_size: int) -> "Sampling":
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 is greedy).")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            raise ConfigError(
                f"top_k={self.top_k} must lie in [1, vocab_size={vocab_size}] (None turns it off)."
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} must lie in (0, 1] (None turns it off).")
        return self


def sample(logits, keys, sampling: Sampling):
    """logits: [batch, vocab] f32; keys: [batch] PRNG keys -> [batch] int32 tokens."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k is not None:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None:
        logits = top_p_filter(logits, sampling.top_p)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def decode(
    params,
    cfg: ModelConfig,
    logits,
    cache: Cache,
    lengths,
    seed,
    *,
    sampling: Sampling,
    eos_id: int | None,
    max_new_tokens: int,
):
    """Samples `max_new_tokens` per row, the first from the prefill `logits` [batch, vocab].

    lengths: [batch] prompt lengths (the first new token goes to position lengths).
    Returns [batch, max_new_tokens] int32; after eos_id a row holds eos_id.
    """
    batch = logits.shape[0]
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(seed), jnp.arange(batch))
    out = jnp.full((batch, max_new_tokens), 0 if eos_id is None else eos_id, jnp.int32)

    def emit(i, logits, out, done):
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
        token = sample(logits, keys, sampling)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        return token, jax.lax.dynamic_update_slice(out, token[:, None], (0, i)), done

    def unfinished(state):
        i, _, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, token, cache, out, done = state
        logits, cache = decode_step(params, cfg, token, lengths + i - 1, cache)
        token, out, done = emit(i, logits, out, done)
        return i + 1, token, cache, out, done

    token, out, done = emit(0, logits, out, jnp.zeros((batch,), bool))
    state = (jnp.int32(1), token, cache, out, done)
    return jax.lax.while_loop(unfinished, step, state)[3]


# `prefill` and `decode` jitted, with keyword-only static arguments; the unused static
# `context` (`sharding.context_key()`) keys the compile cache on the sharding context.
prefill_jit = jax.jit(
    lambda params, tokens, lengths, cfg, max_len, context: prefill(
        params, cfg, tokens, lengths, max_len
    ),
    static_argnames=("cfg", "max_len", "context"),
)
decode_jit = jax.jit(
    lambda params, logits, cache, lengths, seed, cfg, sampling, eos_id, max_new_tokens, context: (
        decode(
            params,
            cfg,
            logits,
            cache,
            lengths,
            seed,
            sampling=sampling,
            eos_id=eos_id,
            max_new_tokens=max_new_tokens,
        )
    ),
    static_argnames=("cfg", "sampling", "eos_id", "max_new_tokens", "context"),
)


def check_prompts(cfg: ModelConfig, prompt_tokens, prompt_lengths, max_new_tokens: int):
    """Validates prompts on the host; returns (tokens [b, t] int32, lengths [b] int32)."""
    tokens = np.asarray(prompt_tokens)
    if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"prompt_tokens must be int ids [batch, prompt_len] with prompt_len >= 1, "
            f"got {tokens.dtype} {tokens.shape}; wrap one prompt as [ids]."
        )
    batch, prompt_len = tokens.shape
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1.")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ConfigError(
            f"prompt_len {prompt_len} + max_new_tokens {max_new_tokens} exceeds "
            f"model.max_seq_len={cfg.max_seq_len}: shorten the prompt or ask for "
            "fewer tokens."
        )
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ConfigError(
            f"prompt ids must lie in [0, vocab_size={cfg.vocab_size}), got "
            f"[{tokens.min()}, {tokens.max()}]; pad with a valid id (e.g. 0)."
        )
    if prompt_lengths is None:
        lengths = np.full((batch,), prompt_len, np.int32)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (batch,) or lengths.min() < 1 or lengths.max() > prompt_len:
            raise ValueError(
                f"prompt_lengths must be [batch={batch}] ints in [1, {prompt_len}], "
                f"got {lengths.tolist()}."
            )
    return tokens.astype(np.int32), lengths.astype(np.int32)


def generate(
    params,
    model_cfg: ModelConfig,
    prompt_tokens,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
    prompt_lengths=None,
) -> jax.Array:
    """Continues each prompt by `max_new_tokens` tokens.

    Args:
      params: model parameters (placed on a mesh or not); inside
        `sharding.activation_sharding` the activations and cache follow its rules.
      prompt_tokens: [batch, prompt_len] int ids, right-padded when `prompt_lengths` is given.
      prompt_lengths: [batch] true lengths; None: every row is a full prompt.
      temperature, top_k, top_p, seed: see the module docstring (temperature 0: greedy).
      eos_id: stop a row at this token; later tokens of the row are eos_id.
    Returns:
      [batch, max_new_tokens] int32 new tokens.
    """
    tokens, lengths = check_prompts(model_cfg, prompt_tokens, prompt_lengths, max_new_tokens)
    sampling = Sampling(float(temperature), top_k, top_p).validate(model_cfg.vocab_size)
    context = sharding.context_key()
    logits, cache = prefill_jit(
        params,
        tokens,
        lengths,
        cfg=model_cfg,
        max_len=tokens.shape[1] + max_new_tokens,
        context=context,
    )
    return decode_jit(
        params,
        logits,
        cache,
        lengths,
        np.int32(seed),
        cfg=model_cfg,
        sampling=sampling,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens,
        context=context,
    )


def complete(
    params, model_cfg: ModelConfig, tokenizer, prompts: Sequence[str], max_new_tokens: int, **kw
) -> list[str]:
    """Each prompt and its continuation, decoded together; all prompts in one batch.

    A prompt is a document that continues (`Tokenizer.encode_documents(eos=False)`: BOS when
    the tokenizer has one, no EOS). Prompts are right-padded and given their true lengths, so
    with greedy decoding each gets the continuation it would get alone (sampled rows also
    depend on their row index). A row stops at the tokenizer's EOS. `kw` goes to `generate`
    (temperature, top_k, top_p, seed).
    """
    ids = tokenizer.encode_documents(list(prompts), eos=False)
    padded = np.full((len(ids), max(map(len, ids))), tokenizer.pad_id, np.int32)
    for row, seq in zip(padded, ids):
        row[: len(seq)] = seq
    new = np.asarray(
        generate(
            params,
            model_cfg,
            padded,
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            prompt_lengths=[len(s) for s in ids],
            **kw,
        )
    ).tolist()
    cut = [row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row for row in new]
    return [tokenizer.decode(p + n) for p, n in zip(ids, cut)]  # decoding drops BOS (control)


def sample_text(
    params, model_cfg: ModelConfig, tokenizer, prompt: str, max_new_tokens: int, **kw
) -> str:
    """`complete` of one prompt."""
    return complete(params, model_cfg, tokenizer, [prompt], max_new_tokens, **kw)[0]
