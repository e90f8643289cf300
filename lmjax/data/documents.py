"""Documents of local text corpora: which files a source names and how they split.

Two file formats, local or `gs://` (read through `tf.io.gfile`):
  * `.txt`: documents are separated by a form feed (`\\f`); a file without one is one document.
  * `.jsonl`: one JSON object per line, the document text under a configurable key.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from lmjax.config import ConfigError

SUFFIXES = (".txt", ".jsonl")
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
DOCUMENT_SEPARATOR = "\f"


def gfile():
    """`tf.io.gfile`, with TensorFlow kept off every accelerator (imported on first use)."""
    from lmjax.data.tf_setup import tensorflow

    return tensorflow().io.gfile


def expand_files(spec: str, *, what: str = "data.text_files") -> list[str]:
    """Sorted `.txt`/`.jsonl` files named by `spec`: comma-separated directories or globs."""
    io = gfile()
    files: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if io.isdir(item):
            matched = [p for suffix in SUFFIXES for p in io.glob(os.path.join(item, "*" + suffix))]
        else:
            matched = io.glob(item)
        if not matched:
            raise ConfigError(f"{what}={item!r} matched no files: give an existing directory or a glob "
                              "of .txt/.jsonl files, e.g. /data/books/*.txt")
        files.extend(matched)
    if not files:
        raise ConfigError(f"{what} is empty: give a directory or a glob of .txt/.jsonl files.")
    bad = [f for f in files if not f.endswith(SUFFIXES)]
    if bad:
        raise ConfigError(f"{what} names unsupported files {bad[:3]}: only .txt (documents split "
                          "by form feeds) and .jsonl (one JSON object per line) are read.")
    return sorted(set(files))


def packaged_files() -> list[str]:
    """The Shakespeare slice shipped inside the package (see corpus/README.md)."""
    return sorted(os.path.join(PACKAGED_DIR, f) for f in os.listdir(PACKAGED_DIR) if f.endswith(".txt"))


def split_text(text: str) -> list[str]:
    """The non-empty documents of a `.txt` file's text, with surrounding blank lines trimmed."""
    docs = (d.strip("\n") for d in text.split(DOCUMENT_SEPARATOR))
    return [d for d in docs if d.strip()]


def read_utf8(path: str) -> str:
    """The text of a UTF-8 file (local or gs://); ConfigError naming the file and the byte
    offset when it is not UTF-8."""
    with gfile().GFile(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r}"
                          "): convert it, e.g. iconv -f LATIN1 -t UTF-8, or remove it from the "
                          "inputs.") from None


def read_documents(path: str, text_key: str = "text") -> Iterator[str]:
    """Yields the documents of one `.txt` or `.jsonl` file, in file order."""
    content = read_utf8(path)
    if path.endswith(".txt"):
        yield from split_text(content)
        return
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{number} is not valid JSON ({e}); .jsonl files hold one "
                              "JSON object per line.") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError(f"{path}:{number} has no string field {text_key!r} (found {keys}): "
                              "set data.text_feature to the key holding the document text.")
        if record[text_key].strip():
            yield record[text_key]
