"""Reading a saved run back: its config, params and tokenizer, and its evaluation batches."""
from __future__ import annotations

from lmjax import checkpoint, data
from lmjax.config import Config
from lmjax.data import prepare


def load_run(workdir: str, step: int | None):
    """(Config, params on one device, tokenizer or None) of a checkpoint of `workdir`.

    `step` None: the newest readable one. The tokenizer is the run's sentencepiece model
    (None for a run on synthetic tokens).
    """
    config, params, tokenizer_path = checkpoint.load_params(workdir, step)
    return config, params, data.load_tokenizer(tokenizer_path) if tokenizer_path else None


def experiment_batches(config: Config, tokenizer, workdir: str) -> list[dict]:
    """The run's own evaluation batches: `config.run.eval_batches` of its eval split."""
    stores = None
    if tokenizer is not None and config.data.source != "synthetic":  # synthetic: no documents
        stores = prepare.run_stores(config.data, tokenizer,
                                    prepare.store_root(config.data, workdir), leader=True)
    pipeline = data.make_pipeline(config.data, tokenizer, stores=stores,
                                  vocab_size=config.model.vocab_size)
    return pipeline.eval_batches(config.run.eval_batches)
