"""A saved run read back: its config, params and tokenizer, and the data pipeline it reads
(for `lmjax eval`, `generate`, `data`, `bench data` and the smoke checks)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import jax

from lmjax.checkpoint import listing
from lmjax.config import Config
from lmjax.data import pipeline as pipeline_lib, prepare, run_stores, tokenizer as tokenizer_lib
from lmjax.model import attention
from lmjax.parallel import distributed, sharding

log = logging.getLogger("lmjax")


def load(workdir: str, step: int | None):
    """(Config, params, tokenizer or None) of a checkpoint of `workdir`.

    `step` None: the newest readable one. The params are sharded over all devices, every
    process's (`sharding.offline_mesh`); compute on them inside `context(config)`. The tokenizer is the
    run's (None for a run on synthetic tokens).
    """
    config, params, tokenizer_path = listing.load_params(workdir, step)
    config = runnable_here(config, jax.default_backend())
    return config, params, tokenizer_lib.load_tokenizer(tokenizer_path) if tokenizer_path else None


def runnable_here(config: Config, backend: str) -> Config:
    """`config` with model.attention=auto (logged) when it names a kernel that `backend` cannot
    run (a run trained with splash, evaluated on a CPU): every implementation computes the same
    numbers to float tolerance, so an offline command runs on whatever machine it is given.
    Training refuses such a config instead (`doctor`'s attention check)."""
    impl = config.model.attention
    if attention.runs_on(impl, backend):
        return config
    log.info(
        "model.attention=%s runs only on %s, this machine runs on %s: using model.attention=auto "
        "(%s here)",
        impl,
        attention.KERNEL_PLATFORM[impl],
        backend,
        attention.resolve_impl("auto", backend),
    )
    return dataclasses.replace(config, model=dataclasses.replace(config.model, attention="auto"))


def context(config: Config) -> contextlib.AbstractContextManager:
    """The activation sharding that goes with `load`'s params: the offline mesh of
    `config.mesh` and its rules (evaluation and generation run inside it)."""
    return sharding.activation_sharding(*sharding.offline_mesh(config.mesh))


def pipeline(
    config: Config, workdir: str, process_index: int = 0, process_count: int = 1
) -> pipeline_lib.Pipeline:
    """`run_stores.run_pipeline` with the run's tokenizer, trained here first when it is missing
    (the store, too, is prepared here when missing)."""
    tokenizer = prepare.prepare_tokenizer(config.data, workdir)
    return run_stores.run_pipeline(
        config, tokenizer, workdir, process_index=process_index, process_count=process_count
    )


def eval_batches(config: Config, tokenizer, workdir: str) -> list[dict]:
    """The run's own evaluation batches: `config.run.eval_batches` of its eval split (every
    process reads all of them; of several processes, process 0 alone prepares a missing
    store and the others wait for it)."""
    pipe = run_stores.run_pipeline(config, tokenizer, workdir, leader=distributed.is_primary())
    return pipe.eval_batches(config.run.eval_batches)
