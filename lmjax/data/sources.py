"""A store's inputs: the shards of the source a data config names (one per part of a text
file, `documents.file_parts`: the file, a byte range of a large one, or a Parquet row group;
one per part of a TFDS split), what the store's content depends on, and where it lives.

A store's directory name holds a hash of what its content depends on (the sources' relative
names and sizes, the text key, the validation fraction, the UTF-8 policy, the tokenizer and
the store format), so another input set or tokenizer gets a new store, re-uploading the same
files (new modification times) finds the old one, and preparing an existing store is a no-op.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Iterator

from lmjax import storage
from lmjax.config import ConfigError, DataConfig
from lmjax.data import documents, store
from lmjax.data.tf_setup import tensorflow
from lmjax.data.tokenizer import Tokenizer
from lmjax.workdir_names import DATA


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


def input_shards(data_cfg: DataConfig) -> tuple[str, list[Shard], list]:
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


def locate(
    data_cfg: DataConfig, tokenizer: Tokenizer, root: str
) -> tuple[str, str, list[Shard], list]:
    """(directory, label, shards, identity) of the store for `data_cfg`'s source under `root`."""
    label, shards, identity = input_shards(data_cfg)
    return (
        os.path.join(root, f"{label}-{store_key(data_cfg, identity, tokenizer)}"),
        label,
        shards,
        identity,
    )


def tfds_texts(name: str, data_dir: str, split: str, feature: str) -> Iterator[bytes]:
    """The raw texts of a TFDS split (or split part), in the dataset's order."""
    import tensorflow_datasets as tfds

    tensorflow()
    ds = tfds.builder(name, data_dir=data_dir or None).as_dataset(split=split, shuffle_files=False)
    yield from ds.map(lambda example: example[feature]).as_numpy_iterator()
