"""Where documents come from: the packaged corpus, local text files, or a registered TFDS dataset.

`resolve_source` checks everything it can before any tokenizing or training (names, paths,
splits, the text feature) and raises `ConfigError` with the fix; `split_texts` then reads one
split's documents as a `tf.data.Dataset` of strings.
"""
from __future__ import annotations

import dataclasses
import os

from lmjax.config import ConfigError, DataConfig
from lmjax.data import documents


@dataclasses.dataclass(frozen=True)
class Source:
    builder: object  # a prepared tfds.core.DatasetBuilder
    text_feature: str
    dataset_id: str  # "name/config:version", recorded in the pipeline state
    train_split: str
    eval_split: str


def _split_name(split: str) -> str:
    """"train[:90%]" -> "train"."""
    return split.split("[", 1)[0].strip()


def _check_splits(builder, name: str, splits: tuple[str, ...], hint: str) -> None:
    available = sorted(builder.info.splits.keys())
    for split in splits:
        if _split_name(split) not in available:
            raise ConfigError(f"dataset {name!r} has no split {split!r} (it has {available}): {hint}")


def _text_source(data_cfg: DataConfig, workdir: str):
    from lmjax.data import text_builder

    if data_cfg.source == "packaged":
        files, label = documents.packaged_files(), "packaged"
    else:
        files, label = documents.expand_files(data_cfg.text_files), "text"
    data_dir = data_cfg.data_dir or (os.path.join(workdir, "tfds") if workdir else "")
    if not data_dir:
        raise ConfigError(f"data.source={data_cfg.source} needs somewhere to write its TFDS shards: "
                          "set data.data_dir or pass the run's workdir.")
    return text_builder.prepare_text_dataset(
        files, label=label, text_key=data_cfg.text_feature,
        validation_fraction=data_cfg.validation_fraction, data_dir=data_dir)


def _registered_source(data_cfg: DataConfig):
    import tensorflow_datasets as tfds

    # Importing the local builder registers `lmjax_text`, so its prepared shards load by name.
    from lmjax.data import text_builder  # noqa: F401

    name, data_dir = data_cfg.tfds_name, data_cfg.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError(f"unknown TFDS dataset data.tfds_name={name!r}: give a registered name "
                          "with optional config and version (e.g. c4/en:3.1.0, lm1b) or a dataset "
                          "prepared under data.data_dir.") from None
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"TFDS dataset data.tfds_name={name!r} cannot be loaded from "
                          f"data.data_dir={data_cfg.data_dir!r}: {e}") from None
    if not builder.is_prepared():
        raise ConfigError(f"TFDS dataset {name!r} is not prepared under {builder.data_dir!r}; lmjax "
                          f"never downloads data: run `tfds build {name} --data_dir DIR` (or "
                          "download_and_prepare) first and set data.data_dir=DIR.")
    return builder


def resolve_source(data_cfg: DataConfig, workdir: str = "") -> Source:
    """Prepares (packaged/text) or opens (tfds) the dataset and checks splits and text feature."""
    from lmjax.data.tf_setup import tensorflow

    tensorflow()  # accelerators hidden before TFDS runs any TensorFlow op
    if data_cfg.source in ("packaged", "text"):
        builder = _text_source(data_cfg, workdir)
        feature, train, evaluation = "text", "train", "validation"
        _check_splits(builder, builder.name, (train, evaluation),
                      "set data.validation_fraction above 0 to hold out validation documents.")
    elif data_cfg.source == "tfds":
        builder = _registered_source(data_cfg)
        feature, train, evaluation = data_cfg.text_feature, data_cfg.train_split, data_cfg.eval_split
        _check_splits(builder, data_cfg.tfds_name, (train, evaluation),
                      "set data.train_split and data.eval_split to existing splits.")
        features = sorted(builder.info.features.keys())
        if feature not in features:
            raise ConfigError(f"dataset {data_cfg.tfds_name!r} has no feature "
                              f"data.text_feature={feature!r}; its features are {features}.")
    else:
        raise ConfigError(f"data.source={data_cfg.source!r} has no documents to read; choose "
                          "packaged, text or tfds.")
    dataset_id = f"{builder.name}/{builder.builder_config.name if builder.builder_config else ''}:" \
                 f"{builder.version}"
    return Source(builder, feature, dataset_id, train, evaluation)


def num_examples(source: Source, split: str) -> int:
    """Documents in the whole named split (before any `[...]` slice)."""
    return int(source.builder.info.splits[_split_name(split)].num_examples)


def split_texts(source: Source, split: str, *, shuffle_files: bool = False, seed: int = 0):
    """`tf.data.Dataset` of the split's document texts (tf.string scalars)."""
    import tensorflow_datasets as tfds

    from lmjax.data.tf_setup import tensorflow

    tensorflow()
    read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True)
    ds = source.builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
    feature = source.text_feature
    return ds.map(lambda example: example[feature])
