"""`lmjax data prepare`: tokenize a run's documents once into a store (see `store.py`).

The work is split into input shards (one per part of a text file, `documents.file_parts`:
the file, a byte range of a large one, or a Parquet row group; one per part of a TFDS split) and
each shard is a pure function of its input: `prepare_shard` tokenizes its documents and writes
its token arrays and shard record (a failed shard leaves nothing behind). An engine maps it over the shards:
  * inline: in this process, one shard after another (what `lmjax train` uses on first start,
    so training needs no Apache Beam);
  * Beam: the pipeline of `beam_engine.py` (`lmjax data prepare`), on the DirectRunner's worker
    processes or on Dataflow, Spark or Flink.
Either way the launcher then reads the shard records and writes store.json last, the commit
marker: a store without it is never read, and a rerun prepares only the shards without a record
(also the repair of a damaged shard: delete its record, run `lmjax data prepare` again).
A store's directory name holds a hash of what its content depends on (the sources' relative
names and sizes, the text key, the validation fraction, the UTF-8 policy, the tokenizer and
the store format), so another input set or tokenizer gets a new store, re-uploading the same
files (new modification times) finds the old one, and preparing an existing store is a no-op.

Finding a run's stores costs O(1) per start: process 0 resolves them once (listing and sizing
the inputs) and records them in WORKDIR/`STORE_RECORD` with the settings that chose them;
later starts and the other processes read that record while those settings are unchanged,
so renaming or re-uploading inputs never orphans a run's store.

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
import hashlib
import logging
import os
import re
import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from lmjax import storage
from lmjax.config import Config, ConfigError, DataConfig
from lmjax.data import beam_engine, documents, mixture, store
from lmjax.data.pipeline import Pipeline, make_pipeline
from lmjax.data.tf_setup import tensorflow
from lmjax.data.tokenizer import Tokenizer, from_serialized, load_tokenizer, train_from_texts
from lmjax.errors import FaultError
from lmjax.workdir_names import DATA, STORE_RECORD, TOKENIZER

log = logging.getLogger(__name__)
# Settings that do not change which stores a run reads (the tokenizer enters by fingerprint).
_NOT_STORE_SETTINGS = (
    "store_dir", "prepare_timeout_s", "tokenizer", "tokenizer_vocab_size", "batch_size",
    "seq_len", "packing", "shuffle", "seed",
)  # fmt: skip
_ENCODE_BATCH = 256  # documents per tokenizer call (sentencepiece encodes a list in threads)


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of preparation work. `path` for a file shard; `tfds_*` for a TFDS part."""

    index: int
    count: int
    name: str  # relative file name (and part), or the TFDS split part
    path: str = ""
    start: int = 0  # the file's part (`documents.file_parts`): bytes or row groups
    stop: int = -1
    tfds_name: str = ""
    tfds_dir: str = ""
    role: str = ""  # TFDS shards: which store split their documents go to


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every shard needs besides its input: pickled to the engine's workers."""

    directory: str
    tokenizer_bytes: bytes
    text_key: str
    validation_fraction: float
    bad_utf8: str


# ---------------------------------------------------------------- sources -> shards


def _relative_names(files: list[str]) -> list[str]:
    if len(files) <= 1:
        return [os.path.basename(f) for f in files]
    root = os.path.commonpath(files) if all("://" not in f for f in files) else ""
    return [os.path.relpath(f, root) if root else f for f in files]


def _tfds_builder(data_cfg: DataConfig):
    import tensorflow_datasets as tfds

    tensorflow()
    name, data_dir = data_cfg.tfds_name, data_cfg.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(
            f"unknown TFDS dataset data.tfds_name={name!r}: give a registered name "
            "with optional config and version (e.g. c4/en:3.1.0, lm1b) or a dataset "
            "prepared under data.data_dir."
        ) from None
    except (ValueError, AssertionError) as e:
        raise ConfigError(
            f"TFDS dataset data.tfds_name={name!r} cannot be loaded from "
            f"data.data_dir={data_cfg.data_dir!r}: {e}"
        ) from None
    if not builder.is_prepared():
        raise ConfigError(
            f"TFDS dataset {name!r} is not prepared under {builder.data_dir!r}; lmjax "
            f"never downloads data: run `tfds build {name} --data_dir DIR` (or "
            "download_and_prepare) first and set data.data_dir=DIR."
        )
    available = sorted(builder.info.splits.keys())
    for split in (data_cfg.train_split, data_cfg.eval_split):
        if split.split("[", 1)[0] not in available:
            raise ConfigError(
                f"dataset {name!r} has no split {split!r} (it has {available}): set "
                "data.train_split and data.eval_split to existing splits."
            )
    features = sorted(builder.info.features.keys())
    if data_cfg.text_feature not in features:
        raise ConfigError(
            f"dataset {name!r} has no feature data.text_feature="
            f"{data_cfg.text_feature!r}; its features are {features}."
        )
    return builder


def _tfds_shards(data_cfg: DataConfig) -> tuple[list[Shard], list]:
    """One shard per file of each split ("train[3shard]"); a sliced split is one shard."""
    builder = _tfds_builder(data_cfg)
    parts = []
    for role, split in (("train", data_cfg.train_split), ("validation", data_cfg.eval_split)):
        files = builder.info.splits[split.split("[", 1)[0]].num_shards
        sliced = "[" in split or files <= 1
        parts += [
            (role, split if sliced else f"{split}[{i}shard]") for i in range(1 if sliced else files)
        ]
    shards = [
        Shard(
            i, len(parts), part, tfds_name=data_cfg.tfds_name, tfds_dir=data_cfg.data_dir, role=role
        )
        for i, (role, part) in enumerate(parts)
    ]
    identity = [
        f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}:"
        f"{builder.version}",
        data_cfg.train_split,
        data_cfg.eval_split,
    ]
    return shards, identity


def plan(data_cfg: DataConfig) -> tuple[str, list[Shard], list]:
    """(label, shards, identity): the work for the run's source and what its content depends on."""
    if data_cfg.source == "tfds":
        shards, identity = _tfds_shards(data_cfg)
        return (
            data_cfg.name or re.sub(r"[^A-Za-z0-9_.-]+", "_", data_cfg.tfds_name),
            shards,
            identity,
        )
    if data_cfg.source == "packaged":
        files = documents.packaged_files()
    elif data_cfg.source == "text":
        files = documents.expand_files(data_cfg.text_files)
    else:
        raise ConfigError(
            f"data.source={data_cfg.source!r} has no documents to prepare; choose "
            "packaged, text or tfds."
        )
    identity, parts = _file_parts(files)
    shards = [
        Shard(i, len(parts), name, path=path, start=start, stop=stop)
        for i, (path, name, start, stop) in enumerate(parts)
    ]
    return data_cfg.name or data_cfg.source, shards, identity


def _file_parts(files: list[str]) -> tuple[list, list[tuple[str, str, int, int]]]:
    """(identity: [name, size, parts] per file; [(path, name, start, stop)] per part)."""
    identity, parts = [], []
    for path, name in zip(files, _relative_names(files)):
        stat = storage.path(path).stat()
        cuts = documents.file_parts(path, stat.length)
        identity.append([name, stat.length, len(cuts)])
        unit = "row groups" if documents.file_format(path) == "parquet" else "bytes"
        parts += [
            (path, name if len(cuts) == 1 else f"{name} {unit} {a}:{b}", a, b) for a, b in cuts
        ]
    return identity, parts


def store_key(data_cfg: DataConfig, identity: list, tokenizer: Tokenizer) -> str:
    described = repr(
        (
            store.FORMAT_VERSION,
            store.layout(),
            identity,
            data_cfg.text_feature,
            data_cfg.validation_fraction,
            data_cfg.bad_utf8,
            tokenizer.fingerprint,
        )
    )
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def store_root(data_cfg: DataConfig, workdir: str) -> str:
    if data_cfg.store_dir:
        return data_cfg.store_dir
    if not workdir:
        raise ConfigError(
            "there is no place for the prepared store: set data.store_dir or give a workdir."
        )
    return os.path.join(workdir, DATA)


# ---------------------------------------------------------------- one shard


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
    for text in tfds_texts(shard.tfds_name, shard.tfds_dir, shard.name, settings.text_key):
        counts.documents += 1
        counts.bytes += len(text)
        if not text.strip():
            counts.empty_documents += 1
            continue
        yield shard.role, text.decode("utf-8")


def training_texts(data_cfg: DataConfig) -> Iterator[str]:
    """The source's training documents in shard order (what a tokenizer is trained on)."""
    _, shards, _ = plan(data_cfg)
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


def tfds_texts(name: str, data_dir: str, split: str, feature: str) -> Iterator[bytes]:
    """The raw texts of a TFDS split (or split part), in the dataset's order."""
    import tensorflow_datasets as tfds

    tensorflow()
    ds = tfds.builder(name, data_dir=data_dir or None).as_dataset(split=split, shuffle_files=False)
    yield from ds.map(lambda example: example[feature]).as_numpy_iterator()


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


def _tokenize_shard(shard: Shard, settings: Settings) -> dict:
    """Writes the shard's arrays: {split: {"tokens", "records"}, plus the read counts}."""
    tokenizer = from_serialized(settings.tokenizer_bytes)
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


# ---------------------------------------------------------------- the whole preparation


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


def locate(
    data_cfg: DataConfig, tokenizer: Tokenizer, root: str
) -> tuple[str, str, list[Shard], list]:
    """(directory, label, shards, identity) of the store for `data_cfg`'s source under `root`."""
    label, shards, identity = plan(data_cfg)
    return (
        os.path.join(root, f"{label}-{store_key(data_cfg, identity, tokenizer)}"),
        label,
        shards,
        identity,
    )


def prepare(
    data_cfg: DataConfig, tokenizer: Tokenizer, root: str, *, beam_options=None
) -> tuple[str, dict]:
    """Prepares (or finds) the store of `data_cfg`'s source under `root`: (directory, store.json).

    beam_options: None prepares inline; Beam PipelineOptions (`beam_engine.pipeline_options`)
    run the Beam pipeline.
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


def run_pipeline(
    config: Config,
    tokenizer: Tokenizer | None,
    workdir: str,
    *,
    leader: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    rows: Sequence[int] | None = None,
) -> Pipeline:
    """The pipeline a run of `config` in `workdir` reads with `tokenizer` (None: synthetic
    tokens): `make_pipeline` over `run_stores` (the leader prepares a missing store)."""
    stores = (
        None if tokenizer is None else run_stores(config.data, tokenizer, workdir, leader=leader)
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


def store_request(data_cfg: DataConfig, tokenizer: Tokenizer, root: str) -> dict:
    """What chooses a run's stores, from its settings alone (no input is listed)."""
    chosen = {k: v for k, v in dataclasses.asdict(data_cfg).items() if k not in _NOT_STORE_SETTINGS}
    return {
        **chosen,
        "root": root,
        "tokenizer": tokenizer.fingerprint,
        "format": store.FORMAT_VERSION,
    }


def run_stores(
    data_cfg: DataConfig, tokenizer: Tokenizer, workdir: str, *, leader: bool
) -> dict[str, str]:
    """{source name: store directory} a run in `workdir` reads (`resolve_stores`), found in
    O(1) from the workdir's `STORE_RECORD` when its settings match; else the leader resolves
    and records them, and the other processes wait for the record (data.prepare_timeout_s)."""
    root = store_root(data_cfg, workdir)
    if not workdir:
        return resolve_stores(data_cfg, tokenizer, root, leader=leader)
    request = store_request(data_cfg, tokenizer, root)
    path = os.path.join(workdir, STORE_RECORD)
    record = store.read_json(path)
    if record is not None and record["request"] == request:
        return record["stores"]
    if not leader:
        return _wait_for_record(path, request, data_cfg.prepare_timeout_s)
    stores = resolve_stores(data_cfg, tokenizer, root, leader=True)
    store.write_json(path, {"request": request, "stores": stores})
    return stores


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
    data_cfg: DataConfig, tokenizer: Tokenizer, root: str, *, leader: bool
) -> dict[str, str]:
    """{source name: store directory} for the settings: the stores data.mixture names
    (prepared beforehand), or the run's own source's store (prepared now if missing,
    `ensure_store`); none for the synthetic source, which reads no store."""
    if data_cfg.mixture:
        return {
            name: find_store(root, name, tokenizer) for name, _ in mixture.parse(data_cfg.mixture)
        }
    if data_cfg.source == "synthetic":
        return {}
    label = data_cfg.name or data_cfg.source
    return {label: ensure_store(data_cfg, tokenizer, root, leader=leader)}


def ensure_store(data_cfg: DataConfig, tokenizer: Tokenizer, root: str, *, leader: bool) -> str:
    """The store directory for a training run: the leader (process 0) prepares it inline when
    it is missing; the other processes wait for its commit (data.prepare_timeout_s)."""
    directory = locate(data_cfg, tokenizer, root)[0]
    if store.read_json(os.path.join(directory, store.META)) is not None:
        return directory
    if leader:
        log.info(
            "preparing the data store %s in this process (run `lmjax data prepare` "
            "beforehand to use several workers)",
            directory,
        )
        prepare(data_cfg, tokenizer, root)
    else:
        log.info("waiting for process 0 to prepare the data store %s", directory)
        wait_for_store(directory, data_cfg.prepare_timeout_s)
    return directory


@dataclasses.dataclass(frozen=True)
class _ShardFn:
    """`prepare_shard` bound to the settings, as a picklable callable for engine workers."""

    settings: Settings

    def __call__(self, shard: Shard) -> dict:
        return prepare_shard(shard, self.settings)


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
