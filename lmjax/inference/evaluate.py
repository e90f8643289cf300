"""Held-out loss, perplexity and bits-per-byte of a model.

`eval_loss` scores batches in the trainer's format. `score_texts` scores raw documents:
each is tokenized as [BOS] + encode(text) with no EOS appended, and every text token is
scored exactly once (BOS is context only, never a target). Documents longer than the
context are covered by sliding windows (`sliding_windows`). Bits-per-byte divides the
summed negative log-likelihood, in bits, by the UTF-8 byte count of the original texts.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.batch import BATCH_DTYPES, BATCH_KEYS, Batch, select
from lmjax.config import ConfigError, ModelConfig
from lmjax.model import objective
from lmjax.parallel import sharding


def _accumulate(totals, params, batch: Batch, cfg: ModelConfig, context):
    """totals: [2] float32 (summed NLL, scored tokens) -> the same plus one batch's."""
    _, aux = objective.loss_terms(params, batch, cfg, 0.0)
    # Replicated, so that every process can read the totals of a multi-host mesh.
    return sharding.constrain(totals + jnp.stack([aux["nll_sum"], aux["tokens"]]), (None,))


# The unused static `context` keys the compile cache on the sharding context.
_accumulate_jit = jax.jit(_accumulate, static_argnames=("cfg", "context"))


def summarize(nll: float, tokens: float) -> dict[str, float]:
    """{"loss": nll / tokens (nats), "perplexity": exp(loss), inf past exp's float range,
    "tokens": int(tokens)}; a ConfigError when nothing was scored."""
    if tokens <= 0:
        raise ConfigError(
            "the evaluation batches score no tokens (empty input or loss_mask all 0)."
        )
    loss = nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "tokens": int(tokens),
    }


def eval_sums(
    params,
    model_cfg: ModelConfig,
    batches: Iterable[dict],
    *,
    place: Callable[[Batch], Batch] | None = None,
) -> tuple[float, float]:
    """(summed NLL in nats, scored tokens) over batches in the format of `lmjax.batch`.

    The sums accumulate in float32 on the device (one compile per batch shape and sharding
    context); the host reads them once, at the end. Under `sharding.activation_sharding` the
    activations follow its rules. `place` turns each batch's host arrays into device arrays
    (the trainer assembles a process's rows into global arrays on its mesh); by default jit
    places them.
    """
    context, totals = sharding.context_key(), jnp.zeros(2, jnp.float32)
    for i, batch in enumerate(batches):
        batch = select(batch, f"eval batch {i}")
        totals = _accumulate_jit(
            totals, params, place(batch) if place else batch, cfg=model_cfg, context=context
        )
    nll, tokens = np.asarray(jax.device_get(totals), np.float64)
    return float(nll), float(tokens)


def eval_loss(
    params,
    model_cfg: ModelConfig,
    batches: Iterable[dict],
    *,
    place: Callable[[Batch], Batch] | None = None,
) -> dict[str, float]:
    """Mean next-token loss over batches (arguments as `eval_sums`): the evaluator of
    training, `lmjax eval` and `lmjax smoke`.

    Returns {"loss": mean NLL in nats, "perplexity": exp(loss), "tokens": scored count}.
    """
    return summarize(*eval_sums(params, model_cfg, batches, place=place))


# ---------------------------------------------------------------- raw text


def sliding_windows(n: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows covering the targets 0..n-1 of one document, each exactly once.

    Target i is predicted from inputs 0..i. A window (start, first, end) feeds inputs
    [start, end) (at most context_len) and scores targets [first, end): the `stride`
    (or fewer, at the end) targets after the previous window, with as much left context as
    fits.
    """
    if not 1 <= stride <= context_len:
        raise ConfigError(f"stride={stride} must lie in [1, context_len={context_len}].")
    windows, end = [], 0
    while end < n:
        first, end = end, min(n, end + (context_len if end == 0 else stride))
        windows.append((max(0, end - context_len), first, end))
    return windows


def _window_rows(docs: Iterable[list[int]], context_len: int, stride: int) -> Iterator[dict]:
    """One row dict of [context_len] arrays per window, right-padded with unscored zeros."""
    for ids in docs:
        inputs, targets = ids[:-1], ids[1:]
        for start, first, end in sliding_windows(len(targets), context_len, stride):
            n = end - start
            row = _empty_row(context_len)
            row["inputs"][:n] = inputs[start:end]
            row["targets"][:n] = targets[start:end]
            row["segment_ids"][:n] = 1
            row["positions"][:n] = np.arange(n)
            row["loss_mask"][first - start : n] = 1.0
            yield row


def _empty_row(context_len: int) -> dict[str, np.ndarray]:
    return {k: np.zeros(context_len, BATCH_DTYPES[k]) for k in BATCH_KEYS}


def _batched(rows: Iterator[dict], batch_size: int, context_len: int) -> Iterator[dict]:
    """Stacks rows into [batch_size, context_len] batches; the last is padded with
    unscored rows so that every batch has one shape (one compile)."""

    def stack(buffer):
        return {k: np.stack([r[k] for r in buffer]) for k in BATCH_KEYS}

    buffer = []
    for row in rows:
        buffer.append(row)
        if len(buffer) == batch_size:
            yield stack(buffer)
            buffer = []
    if buffer:
        yield stack(buffer + [_empty_row(context_len)] * (batch_size - len(buffer)))


def score_texts(
    params,
    model_cfg: ModelConfig,
    tokenizer,
    texts: Sequence[str],
    *,
    context_len: int,
    stride: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """Loss, perplexity and bits-per-byte of raw documents (see the module docstring).

    Args:
      tokenizer: a `Tokenizer`; each text is a document, BOS then its tokens
        (`encode_documents(eos=False)`).
      context_len: model inputs per window (<= model.max_seq_len).
      stride: new targets scored per window after the first (1..context_len); smaller
        strides give each token more left context and cost more windows.
      batch_size: windows per jitted call.
    Returns:
      {"tokens", "loss" (nats per token), "perplexity", "bits_per_byte", "bytes"}.
    """
    if not 1 <= context_len <= model_cfg.max_seq_len:
        raise ConfigError(
            f"context_len={context_len} must lie in [1, model.max_seq_len={model_cfg.max_seq_len}]."
        )
    sliding_windows(0, context_len, stride)  # validates stride before tokenizing
    if tokenizer.bos_id < 0:
        raise ConfigError(
            "the tokenizer has no BOS piece: without one the first token of each "
            "document goes unscored and bits-per-byte would not cover every byte; "
            "train one with `lmjax tokenizer train`, which has one."
        )
    docs = tokenizer.encode_documents(list(texts), eos=False)
    top = max((max(d) for d in docs), default=0)
    if top >= model_cfg.vocab_size:
        raise ConfigError(
            f"token id {top} >= model.vocab_size={model_cfg.vocab_size}: the "
            "tokenizer does not match this model."
        )
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    rows = _window_rows(docs, context_len, stride)
    nll, tokens = eval_sums(params, model_cfg, _batched(rows, batch_size, context_len))
    return {
        **summarize(nll, tokens),
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "bytes": n_bytes,
    }
