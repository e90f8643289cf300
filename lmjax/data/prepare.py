"""`lmjax data prepare`: tokenize a source's documents once into a store (see `store.py`).

Each input shard (`sources.py`) is a pure function of its input: `prepare_shard` tokenizes its
documents and writes its token arrays and shard record (a failed shard leaves nothing behind).
An engine maps it over the shards:
  * inline: in this process, one shard after another (what `lmjax train` uses on first start,
    so training needs no Apache Beam);
  * Beam: the pipeline of `beam_engine.py` (`lmjax data prepare`), on the DirectRunner's worker
    processes or on Dataflow, Spark or Flink.
Either way the launcher then reads the shard records and writes store.json last, the commit
marker: a store without it is never read, and a rerun prepares only the shards without a record
(also the repair of a damaged shard: delete its record, run `lmjax data prepare` again).

Train/validation split, by document: a document of a text file is held out for validation
when the SHA-256 of its text (UTF-8), read as a fraction of 2**256, is below
data.validation_fraction. The decision needs no other document, so shards are independent, and
it does not depend on the file's name, format or place in the corpus (however the corpus is
cut into files, the same documents are held out; copies of a document fall on one side).
TFDS sources use the dataset's own train and eval splits.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import logging
import os
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from lmjax import storage
from lmjax.config import ConfigError, DataConfig
from lmjax.data import beam_engine, documents, store
from lmjax.data.sources import Shard, input_shards, locate, tfds_texts
from lmjax.data.tokenizer import Tokenizer, from_serialized, load_tokenizer, train_from_texts
from lmjax.errors import FaultError
from lmjax.workdir_names import TOKENIZER

log = logging.getLogger(__name__)


_ENCODE_BATCH = 256  # documents per tokenizer call (sentencepiece encodes a list in threads)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every shard needs besides its input: pickled to the engine's workers."""

    directory: str
    tokenizer_bytes: bytes
    text_key: str
    validation_fraction: float
    bad_utf8: str


def held_out(text: str, fraction: float) -> bool:
    """Whether document `text` belongs to the validation split (module docstring)."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return int(digest, 16) < fraction * (1 << 256)


def _shard_documents(
    shard: Shard, settings: Settings, counts: documents.ReadCounts
) -> Iterator[tuple[str, str]]:
    """(split, text) of the shard's documents, in order."""
    if shard.path:
        texts = documents.read_documents(
            shard.path,
            settings.text_key,
            start=shard.start,
            stop=shard.stop,
            bad_utf8=settings.bad_utf8,
            counts=counts,
        )
        for text in texts:
            yield "validation" if held_out(text, settings.validation_fraction) else "train", text
        return
    for raw in tfds_texts(shard.tfds_name, shard.tfds_dir, shard.name, settings.text_key):
        counts.documents += 1
        counts.bytes += len(raw)
        if not raw.strip():
            counts.empty_documents += 1
            continue
        yield shard.role, raw.decode("utf-8")


def training_texts(data_cfg: DataConfig) -> Iterator[str]:
    """The source's training documents in shard order (what a tokenizer is trained on)."""
    _, shards, _ = input_shards(data_cfg)
    settings = Settings(
        "", b"", data_cfg.text_feature, data_cfg.validation_fraction, data_cfg.bad_utf8
    )
    for shard in shards:
        if shard.role in ("", "train"):
            yield from (
                text
                for split, text in _shard_documents(shard, settings, documents.ReadCounts())
                if split == "train"
            )


def prepare_tokenizer(
    data_cfg: DataConfig, workdir: str, *, leader: bool = True, max_chars: int = 200_000_000
) -> Tokenizer | None:
    """The run's tokenizer: `data.tokenizer` if set, else `workdir/tokenizer.model`, trained once.

    Only the leader (process 0) trains: on the first `max_chars` characters of the source's
    training documents with vocabulary `data.tokenizer_vocab_size`, BPE. The other processes
    wait for its file (data.prepare_timeout_s). The synthetic source needs no tokenizer: None.
    """
    if data_cfg.tokenizer:
        return load_tokenizer(data_cfg.tokenizer)
    if data_cfg.source == "synthetic":
        return None
    if not workdir:
        raise ConfigError(
            "data.tokenizer is empty and there is no workdir to train one into: set "
            "data.tokenizer to a SentencePiece .model or a tokenizer.json file."
        )
    path = storage.join(workdir, TOKENIZER)
    if not leader:
        deadline = time.monotonic() + data_cfg.prepare_timeout_s
        while not storage.path(path).exists():
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"waited {data_cfg.prepare_timeout_s:.0f} s for process 0 to "
                    f"train the tokenizer {path}: check process 0's log, or set "
                    "data.tokenizer to a trained model."
                )
            time.sleep(1.0)
    if storage.path(path).exists():
        return load_tokenizer(path)
    texts = _within(training_texts(data_cfg), max_chars)
    return load_tokenizer(
        train_from_texts(texts, data_cfg.tokenizer_vocab_size, "bpe", path[: -len(".model")])
    )


def _within(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The texts until (and including) the one that reaches `max_chars` characters in total."""
    for text in texts:
        yield text
        max_chars -= len(text)
        if max_chars <= 0:
            return


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_shard(shard: Shard, settings: Settings) -> dict:
    """Tokenizes one shard into its token arrays, then writes its shard record; returns it.

    A shard whose record exists is already done: returned without work. A shard that fails
    leaves no array behind; a full disk is a FaultError saying so.
    """
    meta_path = os.path.join(settings.directory, store.shard_meta_file(shard.index, shard.count))
    done = store.read_json(meta_path)
    if done is not None:
        return done
    start = time.perf_counter()
    try:
        record = _tokenize_shard(shard, settings)
        record.update(input=shard.name, seconds=time.perf_counter() - start)
        store.write_json(meta_path, record)
    except BaseException as e:
        store.delete_shard(settings.directory, shard.index, shard.count)
        if "No space left" in str(e) or getattr(e, "errno", None) == errno.ENOSPC:
            raise FaultError(
                f"the disk under {settings.directory} is full (preparing input shard "
                f"{shard.index}, {shard.name}): free space or set data.store_dir elsewhere, "
                "then rerun; finished shards are kept."
            ) from None
        raise
    log.info("prepared shard %d/%d (%s)", shard.index + 1, shard.count, shard.name)
    return record


@functools.lru_cache(maxsize=1)
def worker_tokenizer(serialized: bytes) -> Tokenizer:
    """The tokenizer of `serialized`, made once per worker process for all its shards: each
    Hugging Face tokenizer made keeps about 7.5 MB after it is freed (a 48-shard preparation
    grew to 730 MB of RSS making one per shard)."""
    return from_serialized(serialized)


def _tokenize_shard(shard: Shard, settings: Settings) -> dict:
    """Writes the shard's arrays: {split: {"tokens", "records"}, plus the read counts}."""
    tokenizer = worker_tokenizer(settings.tokenizer_bytes)
    dtype = store.token_dtype(tokenizer.vocab_size)
    writers = {
        split: store.TokenWriter(settings.directory, split, shard.index, shard.count, dtype)
        for split in store.SPLITS
    }
    counts = documents.ReadCounts()
    for batch in _batched(_shard_documents(shard, settings, counts), _ENCODE_BATCH):
        for (split, _), ids in zip(batch, tokenizer.encode_documents([t for _, t in batch])):
            writers[split].add(np.asarray(ids, np.int64))
    return {**{split: w.close() for split, w in writers.items()}, **dataclasses.asdict(counts)}


def _summary(records: list[dict], seconds: float) -> dict:
    total = {
        k: sum(r[k] for r in records)
        for k in ("documents", "bytes", "empty_documents", "empty_files", "bad_utf8")
    }
    total.update({f"{s}_tokens": sum(r[s]["tokens"] for r in records) for s in store.SPLITS})
    tokens = total["train_tokens"] + total["validation_tokens"]
    total.update(
        shards=len(records),
        seconds=seconds,
        tokens_per_second=tokens / max(seconds, 1e-9),
        megabytes_per_second=total["bytes"] / 1e6 / max(seconds, 1e-9),
    )
    return total


def _commit(
    directory: str,
    label: str,
    identity: list,
    tokenizer: Tokenizer,
    records: list[dict],
    seconds: float,
) -> dict:
    summary = _summary(records, seconds)
    for split in store.SPLITS:
        if not summary[f"{split}_tokens"]:
            raise ConfigError(
                f"no document of the source went to the {split} split: add "
                "documents, or change data.validation_fraction (validation takes "
                "documents by hash, so a tiny corpus may give it none)."
            )
    object_tokens, record_tokens = store.layout()
    meta = {
        "format": store.FORMAT_VERSION,
        "object_tokens": object_tokens,
        "record_tokens": record_tokens,
        "dtype": store.token_dtype(tokenizer.vocab_size).name,
        "label": label,
        "tokenizer": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "sources": identity,
        "shards": records,
        "summary": summary,
    }
    store.write_json(os.path.join(directory, store.META), meta)
    return meta


def prepare(
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    root: str,
    *,
    beam_options=None,
    progress: Callable[[], None] = lambda: None,
) -> tuple[str, dict]:
    """Prepares (or finds) the store of `data_cfg`'s source under `root`: (directory, store.json).

    beam_options: None prepares inline, calling `progress` after each finished shard (a
    training run's watchdog); Beam PipelineOptions (`beam_engine.pipeline_options`) run the
    Beam pipeline.
    """
    directory, label, shards, identity = locate(data_cfg, tokenizer, root)
    meta = store.read_json(os.path.join(directory, store.META))
    if meta is not None and not _without_record(directory, shards):
        return directory, meta
    settings = Settings(
        directory,
        tokenizer.serialized,
        data_cfg.text_feature,
        data_cfg.validation_fraction,
        data_cfg.bad_utf8,
    )
    fn = _ShardFn(settings)
    start = time.perf_counter()
    if beam_options is None:
        for shard in shards:
            fn(shard)
            progress()
    else:
        beam_engine.run(fn, shards, beam_options)
    records = _records(directory, shards)
    if meta is not None:
        _check_redone(directory, meta, records)
    return directory, _commit(
        directory, label, identity, tokenizer, records, time.perf_counter() - start
    )


def _without_record(directory: str, shards: list[Shard]) -> list[Shard]:
    """The shards of a committed store whose record was deleted (to redo a damaged shard)."""
    return [
        s
        for s in shards
        if store.read_json(os.path.join(directory, store.shard_meta_file(s.index, s.count))) is None
    ]


def _check_redone(directory: str, meta: dict, records: list[dict]) -> None:
    """A redone shard must hold what the committed store said, or readers' positions move."""
    for index, (old, new) in enumerate(zip(meta["shards"], records)):
        if any(old[s]["tokens"] != new[s]["tokens"] for s in store.SPLITS):
            raise ConfigError(
                f"input shard {index} ({new['input']}) of {directory} now gives other tokens "
                "than when the store was made (its input changed): prepare a new store (set "
                "data.name or data.store_dir) instead of repairing this one."
            )


def _records(directory: str, shards: list[Shard]) -> list[dict]:
    """The shard records an engine wrote, in shard order."""
    records = []
    for shard in shards:
        path = os.path.join(directory, store.shard_meta_file(shard.index, shard.count))
        record = store.read_json(path)
        if record is None:
            raise RuntimeError(
                f"the preparation finished without the shard record {path} of input {shard.name}"
            )
        records.append(record)
    return records


@dataclasses.dataclass(frozen=True)
class _ShardFn:
    """`prepare_shard` bound to the settings, as a picklable callable for engine workers."""

    settings: Settings

    def __call__(self, shard: Shard) -> dict:
        return prepare_shard(shard, self.settings)
