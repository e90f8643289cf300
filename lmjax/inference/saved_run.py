"""A saved run read back: its config, params and tokenizer, and the data pipeline it reads
(for `lmjax eval`, `generate`, `data`, `bench data` and the smoke checks)."""

from __future__ import annotations

from lmjax.checkpoint import listing
from lmjax.config import Config
from lmjax.data import pipeline as pipeline_lib, prepare, tokenizer as tokenizer_lib


def load(workdir: str, step: int | None):
    """(Config, params on one device, tokenizer or None) of a checkpoint of `workdir`.

    `step` None: the newest readable one. The tokenizer is the run's sentencepiece model
    (None for a run on synthetic tokens).
    """
    config, params, tokenizer_path = listing.load_params(workdir, step)
    return config, params, tokenizer_lib.load_tokenizer(tokenizer_path) if tokenizer_path else None


def pipeline(
    config: Config, workdir: str, process_index: int = 0, process_count: int = 1
) -> pipeline_lib.Pipeline:
    """`prepare.run_pipeline` with the run's tokenizer, trained here first when it is missing
    (the store, too, is prepared here when missing)."""
    tokenizer = prepare.prepare_tokenizer(config.data, workdir)
    return prepare.run_pipeline(
        config, tokenizer, workdir, process_index=process_index, process_count=process_count
    )


def eval_batches(config: Config, tokenizer, workdir: str) -> list[dict]:
    """The run's own evaluation batches: `config.run.eval_batches` of its eval split."""
    return prepare.run_pipeline(config, tokenizer, workdir).eval_batches(config.run.eval_batches)
