"""Autoregressive decoding with a key/value cache: prefill, one-token steps, sampling.

Conventions:
  * Prompts are int ids [batch, prompt_len], right-padded when `prompt_lengths` is given;
    nothing is prepended (`sample_text` adds the tokenizer's BOS).
  * The cache holds keys and values of the kv heads (grouped-query attention), one stack
    per kind of layer: "global" [global layers, batch, max_len, kv_heads, head_dim] with
    max_len = prompt_len + max_new_tokens, and "local" (sliding-window layers) [local
    layers, batch, min(sliding_window, max_len), kv_heads, head_dim]. Either is a ring:
    position p goes to slot p % slots, and a token attends to the slots whose held position
    (`held_positions`, from its own absolute position) exists; a global ring never wraps,
    a local one keeps exactly the window. Prefill writes into each slot the key of the
    prompt position it holds, taken from the row's true length, so a short row's padding is
    never read and a long row keeps its last `sliding_window` positions.
  * The prompt is prefilled in one jitted call, attending to itself by `model.attention` as
    training does (`auto`: the platform's flash kernel, so a long prompt never holds its
    score matrix); the new tokens come from one jitted `lax.while_loop` of one-token steps
    over the fixed-size cache (no per-token compiles), attending through
    `attention.attention_with_mask` (XLA) whatever `model.attention` selects. The layer
    scan carries the cache, each layer updating its row of its kind's stack, so mixed
    local/global stacks still scan.
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
from lmjax.parallel import distributed, sharding

Cache = dict[str, dict[str, jax.Array]]  # kind -> "k", "v": [its layers, batch, slots, kv, hd]
CACHE_AXES = (None, "act_batch", "act_seq", "act_kv_heads", None)


# ---------------------------------------------------------------- cached forward


def _kind(local: bool) -> str:
    return "local" if local else "global"


def cache_slots(cfg: ModelConfig, max_len: int, *, window_cache: bool = True) -> dict:
    """{kind: (its number of layers, its cache slots)} for each kind ("global", "local") of
    layer the model has: a global layer keeps max_len slots, a local one min(sliding_window,
    max_len) (max_len without `window_cache`, the full cache kept for comparison)."""
    kinds = transformer.layer_is_local(cfg)
    out = {}
    for local in sorted(set(kinds)):
        slots = min(cfg.sliding_window, max_len) if local and window_cache else max_len
        out[_kind(local)] = (kinds.count(local), slots)
    return out


def init_cache(cfg: ModelConfig, batch: int, max_len: int, *, window_cache: bool = True) -> Cache:
    """Zeroed keys and values per kind of layer, each [layers of the kind, batch,
    `cache_slots`, kv_heads, head_dim], cfg.dtype."""
    cache = {}
    for kind, (layers, slots) in cache_slots(cfg, max_len, window_cache=window_cache).items():
        zeros = jnp.zeros((layers, batch, slots, cfg.n_kv_heads, cfg.head_dim), cfg.dtype)
        cache[kind] = {"k": zeros, "v": zeros}
    return _constrain(cache)


def _constrain(cache: Cache) -> Cache:
    return jax.tree.map(lambda a: sharding.constrain(a, CACHE_AXES), cache)


def held_positions(positions, slots: int):
    """The absolute position each cache slot holds once `positions` is written: slot s
    holds the latest position p <= q with p % slots == s (negative: none yet).

    positions: [batch, t] int (q) -> [batch, t, slots] int.
    """
    q = positions[:, :, None]
    return q - (q - jnp.arange(slots)[None, None, :]) % slots


def _run_layers(params, cfg: ModelConfig, x, positions, cache: Cache, attend):
    """x [batch, t, embed] at `positions` [batch, t] through every layer, the cache in the
    scan's carry (each kind's stack has its own shape, so it cannot be a per-layer input).
    `attend(q, k, v, own, index, spec) -> (ctx, own)` attends for a layer that is row
    `index` of its kind's stack `own` ({"k", "v"}) and returns that stack updated."""
    kinds = transformer.layer_is_local(cfg)
    index = [kinds[:i].count(local) for i, local in enumerate(kinds)]
    ropes = {local: transformer.rope_tables(positions, cfg, local) for local in set(kinds)}

    def layer_step(carry, xs, local: bool):
        (x, cache), (layer, i), kind = carry, xs, _kind(local)
        spec = transformer.scores_spec(cfg, local)

        def attend_layer(q, k, v):
            return attend(q, k, v, cache[kind], i, spec)

        sin, cos = ropes[local]
        x, own = transformer.decoder_layer(x, layer, sin, cos, attend_layer, cfg)[:2]
        return (x, {**cache, kind: own}), None

    for start, end, stack in transformer.run_stacks(params, cfg):
        xs = (stack, jnp.asarray(index[start:end]))
        layers = range(start, end)
        (x, cache), _ = transformer.scan_layers(layer_step, (x, cache), xs, cfg, layers=layers)
    return x, _constrain(cache)


def prefill(params, cfg: ModelConfig, tokens, lengths, max_len: int, *, window_cache=True):
    """Runs right-padded prompts and fills a fresh cache.

    The prompt attends to itself, causal and within each local layer's window, by
    `model.attention` as in training (`attention.prefill_attention`: `auto` is the
    platform's flash kernel); every slot of a layer's cache then receives the key and
    value of the prompt position it holds (`held_positions` of the row's last true
    position): a local layer keeps each row's last `sliding_window` true positions, never
    its padding.

    Args:
      tokens: [batch, prompt_len] int ids; lengths: [batch] int true prompt lengths (>= 1).
      max_len: cache length (>= prompt_len).
    Returns:
      (float32 next-token logits at each prompt's last token [batch, vocab], cache).
    """
    batch, prompt_len = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
    rows = jnp.arange(batch)[:, None]

    def attend(q, k, v, own, i, spec):
        ctx = attn_lib.prefill_attention(q, k, v, impl=cfg.attention, spec=spec)
        held = held_positions((lengths - 1)[:, None], own["k"].shape[2])[:, 0]
        source = jnp.maximum(held, 0)  # a slot holding nothing yet gets a key never read
        new = {
            name: jax.lax.dynamic_update_index_in_dim(
                own[name], x[rows, source].astype(own[name].dtype), i, 0
            )
            for name, x in (("k", k), ("v", v))
        }
        return ctx, new

    x = transformer.embed(params, tokens, cfg)
    cache = init_cache(cfg, batch, max_len, window_cache=window_cache)
    hidden, cache = _run_layers(params, cfg, x, positions, cache, attend)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return transformer.unembed(params, last, cfg)[:, 0], cache


def decode_step(params, cfg: ModelConfig, tokens, positions, cache: Cache):
    """One token per row: its key and value go to slot `position % slots` of each layer's
    cache, then it attends to the slots holding positions within its window (`held_positions`).
    tokens, positions: [batch] int -> (logits [batch, vocab], cache)."""
    positions = positions[:, None]
    rows = jnp.arange(positions.shape[0])[:, None]

    def attend(q, k, v, own, i, spec):
        slots = own["k"].shape[2]
        new = {
            name: own[name].at[i, rows, positions % slots].set(x.astype(own[name].dtype))
            for name, x in (("k", k), ("v", v))
        }
        held = held_positions(positions, slots)
        mask = held >= 0
        if spec.window:  # only a full-length local cache (window_cache=False) holds older keys
            mask = mask & (positions[:, :, None] - held < spec.window)
        ctx = attn_lib.attention_with_mask(q, new["k"][i], new["v"][i], mask, spec)
        return ctx, new

    x = transformer.embed(params, tokens[:, None], cfg)
    hidden, cache = _run_layers(params, cfg, x, positions, cache, attend)
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
    Returns ([batch, max_new_tokens] int32, after eos_id a row holds eos_id; the cache after
    the last step, so that `decode_jit`, which donates the cache, updates it in place instead
    of copying it).
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
    _, _, cache, out, _ = jax.lax.while_loop(unfinished, step, state)
    return out, cache


# `prefill` and `decode` jitted, with keyword-only static arguments; the unused static
# `context` (`sharding.context_key()`) keys the compile cache on the sharding context.
# `decode_jit` consumes the cache it is given (donated, so that its loop writes the buffers
# in place rather than a copy of them) and returns (tokens, the final cache).
prefill_jit = jax.jit(
    lambda params, tokens, lengths, cfg, max_len, context, window_cache=True: prefill(
        params, cfg, tokens, lengths, max_len, window_cache=window_cache
    ),
    static_argnames=("cfg", "max_len", "context", "window_cache"),
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
    donate_argnames=("cache",),
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
    new, _ = decode_jit(
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
    return new


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
    new = generate(
        params,
        model_cfg,
        padded,
        max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id,
        prompt_lengths=[len(s) for s in ids],
        **kw,
    )
    new = distributed.host_copy(new).tolist()  # rows may lie on several processes' devices
    cut = [row[: row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row for row in new]
    return [tokenizer.decode(p + n) for p, n in zip(ids, cut)]  # decoding drops BOS (control)


def sample_text(
    params, model_cfg: ModelConfig, tokenizer, prompt: str, max_new_tokens: int, **kw
) -> str:
    """`complete` of one prompt."""
    return complete(params, model_cfg, tokenizer, [prompt], max_new_tokens, **kw)[0]
