"""Held-out loss, perplexity and bits-per-byte of a model.

`eval_loss` scores batches in the trainer's format. `score_texts` scores raw documents:
each is tokenized as [BOS] + encode(text) with no EOS appended, and every text token is
scored exactly once (BOS is context only, never a target). Documents longer than the
context are covered by sliding windows (`sliding_windows`). Bits-per-byte divides the
summed negative log-likelihood, in bits, by the UTF-8 byte count of the original texts.
"""
from __future__ import annotations

import glob
import json
import math
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from lmjax.config import Config, ConfigError, ModelConfig
from lmjax import sharding
from lmjax import train as train_lib  # attributes read at call time: train may import us


def _batch_sums(params, batch, cfg: ModelConfig, context):
    """(sum of masked NLL, number of scored tokens) of one batch, both float32 scalars."""
    _, aux = train_lib.loss_terms(params, batch, cfg, 0.0)
    return aux["nll_sum"], aux["tokens"]


# The unused static `context` keys the compile cache on the sharding context.
_batch_sums_jit = jax.jit(_batch_sums, static_argnames=("cfg", "context"))


def _summarize(nll: float, tokens: float) -> dict[str, float]:
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "tokens": int(tokens)}


def _nll_and_tokens(params, cfg: ModelConfig, batches: Iterable[dict]) -> tuple[float, float]:
    """Float64 host totals over batches of [batch, seq] arrays (one compile per shape)."""
    keys, context, sums = train_lib.BATCH_KEYS, sharding.context_key(), []
    for i, batch in enumerate(batches):
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"eval batch {i} lacks {missing}; batches need {list(keys)} as "
                             "[batch, seq] arrays.")
        sums.append(_batch_sums_jit(params, {k: batch[k] for k in keys}, cfg=cfg, context=context))
    totals = np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2).sum(axis=0)
    if totals[1] == 0:
        raise ConfigError("the evaluation batches score no tokens (empty input or loss_mask all 0).")
    return float(totals[0]), float(totals[1])


def eval_loss(params, model_cfg: ModelConfig, batches: Iterable[dict]) -> dict[str, float]:
    """Mean next-token loss over batches of the trainer's format.

    batches: dicts of [batch, seq] arrays "inputs", "targets", "segment_ids", "positions",
    and "loss_mask" (1 where the target is scored).
    Returns {"loss": mean NLL in nats, "perplexity": exp(loss), "tokens": scored count}.
    """
    return _summarize(*_nll_and_tokens(params, model_cfg, batches))


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
            row["loss_mask"][first - start:n] = 1.0
            yield row


def _empty_row(context_len: int) -> dict[str, np.ndarray]:
    row = {k: np.zeros(context_len, np.int32) for k in train_lib.BATCH_KEYS}
    row["loss_mask"] = np.zeros(context_len, np.float32)
    return row


def _batched(rows: Iterator[dict], batch_size: int, context_len: int) -> Iterator[dict]:
    """Stacks rows into [batch_size, context_len] batches; the last is padded with
    unscored rows so that every batch has one shape (one compile)."""
    def stack(buffer):
        return {k: np.stack([r[k] for r in buffer]) for k in train_lib.BATCH_KEYS}

    buffer = []
    for row in rows:
        buffer.append(row)
        if len(buffer) == batch_size:
            yield stack(buffer)
            buffer = []
    if buffer:
        yield stack(buffer + [_empty_row(context_len)] * (batch_size - len(buffer)))


def score_texts(params, model_cfg: ModelConfig, tokenizer, texts: Sequence[str], *,
                context_len: int, stride: int, batch_size: int = 8) -> dict[str, float]:
    """Loss, perplexity and bits-per-byte of raw documents (see the module docstring).

    Args:
      tokenizer: `encode(str) -> list[int]` and `bos_id`.
      context_len: model inputs per window (<= model.max_seq_len).
      stride: new targets scored per window after the first (1..context_len); smaller
        strides give each token more left context and cost more windows.
      batch_size: windows per jitted call.
    Returns:
      {"tokens", "loss" (nats per token), "perplexity", "bits_per_byte", "bytes"}.
    """
    if not 1 <= context_len <= model_cfg.max_seq_len:
        raise ConfigError(f"context_len={context_len} must lie in [1, model.max_seq_len="
                         f"{model_cfg.max_seq_len}].")
    sliding_windows(0, context_len, stride)  # validates stride before tokenizing
    if tokenizer.bos_id is None or tokenizer.bos_id < 0:
        raise ConfigError("the tokenizer has no BOS id; score_texts starts every document with it.")
    docs = [[tokenizer.bos_id] + list(tokenizer.encode(text)) for text in texts]
    top = max((max(d) for d in docs), default=0)
    if top >= model_cfg.vocab_size:
        raise ConfigError(f"token id {top} >= model.vocab_size={model_cfg.vocab_size}: the "
                         "tokenizer does not match this model.")
    n_bytes = sum(len(text.encode("utf-8")) for text in texts)
    rows = _window_rows(docs, context_len, stride)
    nll, tokens = _nll_and_tokens(params, model_cfg, _batched(rows, batch_size, context_len))
    return {**_summarize(nll, tokens), "bits_per_byte": nll / math.log(2) / n_bytes,
            "bytes": n_bytes}


# ---------------------------------------------------------------- command line


def load_run(workdir: str, step: int | None):
    """(Config, params on one device, tokenizer or None) of a checkpoint of `workdir`.

    `step` None: the newest readable one. The tokenizer is the run's sentencepiece model
    (None for a run on synthetic tokens).
    """
    from lmjax import checkpoint, data

    config, params, tokenizer_path = checkpoint.load_params(workdir, step)
    return config, params, data.load_tokenizer(tokenizer_path) if tokenizer_path else None


def experiment_batches(config: Config, tokenizer, workdir: str) -> list[dict]:
    """The run's own evaluation batches: `config.run.eval_batches` of its eval split."""
    from lmjax import data
    from lmjax.data import prepare

    stores = None if tokenizer is None else prepare.run_stores(
        config.data, tokenizer, prepare.store_root(config.data, workdir), leader=True)
    pipeline = data.make_pipeline(config.data, tokenizer, stores=stores,
                                  vocab_size=config.model.vocab_size)
    return pipeline.eval_batches(config.run.eval_batches)


def main(workdir: str, step: int | None = None, text_files: Sequence[str] = (),
         use_experiment_data: bool = False, as_json: bool = False, *,
         context_len: int | None = None, stride: int | None = None,
         load: Callable = load_run, batches_for: Callable = experiment_batches) -> dict:
    """`lmjax eval`: scores a checkpoint on text files or on the experiment's eval split.

    text_files: globs of UTF-8 files, one document each (see `score_texts`). context_len
    defaults to the run's data.seq_len, stride to half of it. `load(workdir, step)` and
    `batches_for(config, tokenizer, workdir)` are `load_run` and `experiment_batches`
    unless replaced. Prints one line (or JSON) and returns the numbers.
    """
    if bool(text_files) == bool(use_experiment_data):
        raise ConfigError("choose what to evaluate: --text-files GLOB... or --experiment-data.")
    paths = sorted({p for pattern in text_files for p in glob.glob(pattern)})
    if text_files and not paths:
        raise FileNotFoundError(f"--text-files {' '.join(text_files)} matched no files.")
    config, params, tokenizer = load(workdir, step)
    if paths:
        if tokenizer is None:
            raise ConfigError(f"the run in {workdir} has no tokenizer (synthetic data): it can only "
                             "be evaluated with --experiment-data.")
        from lmjax.data.documents import read_utf8
        texts = [read_utf8(path) for path in paths]
        context_len = context_len or config.data.seq_len
        result = score_texts(params, config.model, tokenizer, texts, context_len=context_len,
                             stride=stride or max(1, context_len // 2))
        result["files"] = len(paths)
    else:
        result = eval_loss(params, config.model, batches_for(config, tokenizer, workdir))
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in result.items()))
    return result
