"""What a run reads: the stores of its source (or of data.mixture's sources), found, or
prepared by process 0 when missing while the other processes wait, and the pipeline over them.

Finding a run's stores costs O(1) per start: process 0 resolves them once (listing and sizing
the inputs) and records them in WORKDIR/`STORE_RECORD` with the settings that chose them;
later starts and the other processes read that record while those settings are unchanged,
so renaming or re-uploading inputs never orphans a run's store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import Callable, Sequence

import numpy as np

from lmjax import storage
from lmjax.config import Config, ConfigError, DataConfig
from lmjax.data import mixture, prepare, store
from lmjax.data.pipeline import Pipeline, make_pipeline
from lmjax.data.sources import locate, store_root
from lmjax.data.tokenizer import Tokenizer
from lmjax.workdir_names import STORE_RECORD

log = logging.getLogger(__name__)


# Settings that do not change which stores a run reads (the tokenizer enters by fingerprint).
_NOT_STORE_SETTINGS = (
    "store_dir", "prepare_timeout_s", "tokenizer", "tokenizer_vocab_size", "batch_size",
    "seq_len", "packing", "shuffle", "seed",
)  # fmt: skip


def run_pipeline(
    config: Config,
    tokenizer: Tokenizer | None,
    workdir: str,
    *,
    leader: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    rows: Sequence[int] | np.ndarray | None = None,
    progress: Callable[[], None] = lambda: None,
) -> Pipeline:
    """The pipeline a run of `config` in `workdir` reads with `tokenizer` (None: synthetic
    tokens): `make_pipeline` over `run_stores` (the leader prepares a missing store, calling
    `progress` after each shard)."""
    stores = (
        None
        if tokenizer is None
        else run_stores(config.data, tokenizer, workdir, leader=leader, progress=progress)
    )
    return make_pipeline(
        config.data,
        tokenizer,
        process_index=process_index,
        process_count=process_count,
        rows=rows,
        stores=stores,
        vocab_size=config.model.vocab_size,
    )


def run_stores(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    workdir: str,
    *,
    leader: bool,
    progress: Callable[[], None] = lambda: None,
) -> dict[str, str]:
    """{source name: store directory} a run in `workdir` reads (`resolve_stores`), found in
    O(1) from the workdir's `STORE_RECORD` when its settings match; else the leader resolves
    and records them, and the other processes wait for the record (data.prepare_timeout_s)."""
    root = store_root(data_cfg, workdir)
    if not workdir:
        return resolve_stores(data_cfg, tokenizer, root, leader=leader, progress=progress)
    request = store_request(data_cfg, tokenizer, root)
    path = os.path.join(workdir, STORE_RECORD)
    record = store.read_json(path)
    if record is not None and record["request"] == request:
        return record["stores"]
    if not leader:
        return _wait_for_record(path, request, data_cfg.prepare_timeout_s)
    stores = resolve_stores(data_cfg, tokenizer, root, leader=True, progress=progress)
    store.write_json(path, {"request": request, "stores": stores})
    return stores


def store_request(data_cfg: DataConfig, tokenizer: Tokenizer, root: str) -> dict:
    """What chooses a run's stores, from its settings alone (no input is listed)."""
    chosen = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in _NOT_STORE_SETTINGS}
    return {
        **chosen,
        "root": root,
        "tokenizer": tokenizer.fingerprint,
        "format": store.FORMAT_VERSION,
    }


def _wait_for_record(path: str, request: dict, timeout_s: float, poll_s: float = 1.0) -> dict:
    """The stores process 0 records in `path` for `request` (it prepares missing ones first)."""
    log.info("waiting for process 0 to find or prepare the data stores (%s)", path)
    deadline = time.monotonic() + timeout_s
    while (record := store.read_json(path)) is None or record["request"] != request:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"waited {timeout_s:.0f} s for process 0 to prepare the data store and record "
                f"it in {path}: check process 0's log; prepare large corpora beforehand "
                "with `lmjax data prepare`, or raise data.prepare_timeout_s."
            )
        time.sleep(poll_s)
    return record["stores"]


def resolve_stores(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    root: str,
    *,
    leader: bool,
    progress: Callable[[], None] = lambda: None,
) -> dict[str, str]:
    """{source name: store directory} for the settings: the stores data.mixture names
    (prepared beforehand), or the run's own source's store (prepared now if missing,
    `ensure_store`, calling `progress` after each shard); none for the synthetic source."""
    if data_cfg.mixture:
        return {
            name: find_store(root, name, tokenizer) for name, _ in mixture.parse(data_cfg.mixture)
        }
    if data_cfg.source == "synthetic":
        return {}
    label = data_cfg.name or data_cfg.source
    return {label: ensure_store(data_cfg, tokenizer, root, leader=leader, progress=progress)}


def find_store(root: str, name: str, tokenizer: Tokenizer) -> str:
    """The committed store named `name` under `root` that `tokenizer` made (data.mixture)."""
    found = []
    for path in storage.glob(storage.join(root, f"{name}-*")):
        meta = store.read_json(os.path.join(path, store.META))
        if (
            re.fullmatch(rf"{re.escape(name)}-[0-9a-f]{{12}}", os.path.basename(path))
            and meta
            and meta["tokenizer"] == tokenizer.fingerprint
        ):
            found.append(path)
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(found)})"
        raise ConfigError(
            f"data.mixture names {name!r}, but {root} holds {what} prepared store "
            f"named {name!r} made with tokenizer {tokenizer.fingerprint}: prepare "
            f"exactly one with `lmjax data prepare --set data.name={name} --set "
            f"data.tokenizer=... --set data.store_dir={root}` and its source settings."
        )
    return found[0]


def ensure_store(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    root: str,
    *,
    leader: bool,
    progress: Callable[[], None] = lambda: None,
) -> str:
    """The store directory for a training run: the leader (process 0) prepares it inline when
    it is missing, calling `progress` after each shard; the other processes wait for its
    commit (data.prepare_timeout_s in all)."""
    directory = locate(data_cfg, tokenizer, root)[0]
    if store.read_json(os.path.join(directory, store.META)) is not None:
        return directory
    if leader:
        log.info(
            "preparing the data store %s in this process (run `lmjax data prepare` "
            "beforehand to use several workers)",
            directory,
        )
        prepare.prepare(data_cfg, tokenizer, root, progress=progress)
    else:
        log.info("waiting for process 0 to prepare the data store %s", directory)
        wait_for_store(directory, data_cfg.prepare_timeout_s)
    return directory


def wait_for_store(directory: str, timeout_s: float, poll_s: float = 1.0) -> dict:
    """Waits until `directory` holds a committed store (made by process 0); returns store.json."""
    deadline = time.monotonic() + timeout_s
    path = os.path.join(directory, store.META)
    while (meta := store.read_json(path)) is None:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"waited {timeout_s:.0f} s for process 0 to prepare the data store "
                f"{directory} ({store.META} never appeared): check process 0's log; "
                "prepare large corpora beforehand with `lmjax data prepare`, or "
                "raise data.prepare_timeout_s."
            )
        time.sleep(poll_s)
    return meta
