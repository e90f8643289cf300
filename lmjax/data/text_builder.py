"""A TFDS dataset builder for local text corpora (`.txt`/`.jsonl`, local or gs://).

`prepare_text_dataset` writes real TFDS shards (`train` and `validation` splits) under
`data_dir/lmjax_text/<label>-<fingerprint>/1.0.0/`. The fingerprint hashes the files' contents,
their relative paths, the text key and the validation fraction, so a changed corpus gets a new
directory and never mixes with old shards. The split is by document and deterministic: taking
documents in the order of their keys' SHA-256, validation gets them until it holds `fraction`
of the corpus's characters (at least one document when the fraction is positive).

Importing this module imports tensorflow_datasets; `lmjax.data.sources` imports it lazily.
"""
from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds

from lmjax.config import ConfigError
from lmjax.data import documents

NAME = "lmjax_text"


def _relative_names(files: list[str]) -> list[str]:
    if len(files) <= 1:
        return [os.path.basename(f) for f in files]
    root = os.path.commonpath(files) if all(not f.startswith("gs://") for f in files) else ""
    return [os.path.relpath(f, root) if root else f for f in files]


def _document_sizes(files: list[str], names: list[str], text_key: str) -> dict[str, int]:
    """{"file:index": characters} of every document."""
    return {f"{name}:{i}": len(text) for path, name in zip(files, names)
            for i, text in enumerate(documents.read_documents(path, text_key))}


def validation_keys(sizes: dict[str, int], fraction: float) -> set[str]:
    """Documents for validation: in key-hash order until they hold `fraction` of the characters."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={fraction} must lie in [0, 1).")
    chosen: set[str] = set()
    target, held = fraction * sum(sizes.values()), 0
    for key in sorted(sizes, key=lambda k: hashlib.sha256(k.encode()).hexdigest()):
        if held >= target and (chosen or fraction == 0):
            break
        chosen.add(key)
        held += sizes[key]
    if len(chosen) >= len(sizes):
        raise ConfigError(f"the corpus has only {len(sizes)} document(s): with "
                          f"data.validation_fraction={fraction} nothing is left for training; add "
                          "documents (separate them with form feeds in .txt files) or lower it.")
    return chosen


def corpus_fingerprint(files: list[str], text_key: str, validation_fraction: float) -> str:
    digest = hashlib.sha256(f"{text_key}|validation by characters {validation_fraction!r}".encode())
    io = documents.gfile()
    for path, name in zip(files, _relative_names(files)):
        with io.GFile(path, "rb") as f:
            content = hashlib.sha256(f.read()).hexdigest()
        digest.update(f"|{name}|{content}".encode())
    return digest.hexdigest()[:12]


class LmjaxText(tfds.core.GeneratorBasedBuilder):
    """Documents of local `.txt`/`.jsonl` files; features `text` and `id` (`file:index`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Documents of local text files, split by document hash."}

    def __init__(self, *, files: tuple[str, ...] = (), text_key: str = "text",
                 validation_fraction: float = 0.05, **kwargs):
        self._files = list(files)
        self._names = _relative_names(self._files)
        self._text_key = text_key
        self._validation_fraction = validation_fraction
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Documents of local text files prepared by lmjax.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                                 "id": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is local
        held_out = validation_keys(_document_sizes(self._files, self._names, self._text_key),
                                   self._validation_fraction)
        splits = {"train": self._generate_examples(lambda k: k not in held_out)}
        if held_out:
            splits["validation"] = self._generate_examples(lambda k: k in held_out)
        return splits

    def _generate_examples(self, keep):
        for path, name in zip(self._files, self._names):
            for i, text in enumerate(documents.read_documents(path, self._text_key)):
                key = f"{name}:{i}"
                if keep(key):
                    yield key, {"text": text, "id": key}


def prepare_text_dataset(files: list[str], *, label: str, text_key: str,
                         validation_fraction: float, data_dir: str) -> tfds.core.DatasetBuilder:
    """Builds (once) and returns the prepared builder for these files under `data_dir`."""
    fingerprint = corpus_fingerprint(files, text_key, validation_fraction)
    config = tfds.core.BuilderConfig(name=f"{label}-{fingerprint}",
                                     description=f"{len(files)} file(s), text key {text_key!r}")
    builder = LmjaxText(files=files, text_key=text_key, validation_fraction=validation_fraction,
                        config=config, data_dir=data_dir)
    if not builder.is_prepared():
        tfds.disable_progress_bar()
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except OSError:
            # Another process renamed its finished copy into place first: use that one.
            if not builder.is_prepared():
                raise
    return builder
