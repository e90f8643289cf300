"""Documents of local text corpora: which files a source names and how they split.

Two file formats, local or `gs://` (read through `tf.io.gfile`):
  * `.txt`: documents are separated by a form feed (`\\f`); a file without one is one document.
  * `.jsonl` (or gzipped `.jsonl.gz`): one JSON object per line, the text under a configurable key.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Iterator

from lmjax.config import ConfigError
from lmjax.data.tf_setup import tensorflow

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz")
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
DOCUMENT_SEPARATOR = "\f"


def gfile():
    """`tf.io.gfile`, with TensorFlow kept off every accelerator (imported on first use)."""
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
            raise ConfigError(
                f"{what}={item!r} matched no files: give an existing directory or a glob "
                "of .txt/.jsonl files, e.g. /data/books/*.txt"
            )
        files.extend(matched)
    if not files:
        raise ConfigError(f"{what} is empty: give a directory or a glob of .txt/.jsonl files.")
    bad = [f for f in files if not f.endswith(SUFFIXES)]
    if bad:
        raise ConfigError(
            f"{what} names unsupported files {bad[:3]}: only .txt (documents split "
            "by form feeds) and .jsonl (one JSON object per line) are read."
        )
    return sorted(set(files))


def packaged_files() -> list[str]:
    """The Shakespeare slice shipped inside the package (see corpus/README.md)."""
    return sorted(
        os.path.join(PACKAGED_DIR, f) for f in os.listdir(PACKAGED_DIR) if f.endswith(".txt")
    )


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
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 4]!r}"
            "): convert it, e.g. iconv -f LATIN1 -t UTF-8, or remove it from the "
            "inputs."
        ) from None


@dataclasses.dataclass
class ReadCounts:
    """What reading saw besides documents: skipped items and input bytes."""

    documents: int = 0
    bytes: int = 0
    empty_documents: int = 0
    empty_files: int = 0
    bad_utf8: int = 0

    def add(self, other: "ReadCounts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _pieces(content: bytes, jsonl: bool) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw bytes) of each document (.txt, split at form feeds) or line (.jsonl).
    A form feed and a newline are single bytes that never occur inside a UTF-8 sequence."""
    sep = b"\n" if jsonl else DOCUMENT_SEPARATOR.encode()
    offset = 0
    for piece in content.split(sep):
        yield offset, piece
        offset += len(piece) + 1


def _decode(raw: bytes, path: str, offset: int, bad_utf8: str, counts: ReadCounts) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if bad_utf8 == "skip":
            counts.bad_utf8 += 1
            return None
        raise ConfigError(
            f"{path}: byte {offset + e.start} is not UTF-8 ({e.reason}): fix the "
            "file, or set data.bad_utf8=skip to skip such documents and count "
            "them."
        ) from None


def _jsonl_text(line: str, path: str, number: int, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}:{number} is not valid JSON ({e}); .jsonl files hold one JSON object per line."
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ConfigError(
            f"{path}:{number} has no string field {text_key!r} (found {keys}): "
            "set data.text_feature to the key holding the document text."
        )
    return record[text_key]


def read_documents(
    path: str, text_key: str = "text", *, bad_utf8: str = "error", counts: ReadCounts | None = None
) -> Iterator[str]:
    """Yields the non-empty documents of one `.txt`, `.jsonl` or `.jsonl.gz` file, in file order.

    Bytes that are not UTF-8 raise ConfigError naming the file and byte offset (of the
    decompressed content for .gz), or with `bad_utf8="skip"` skip their document; empty
    documents and files are skipped. Both are tallied in `counts`.
    """
    counts = counts if counts is not None else ReadCounts()
    with gfile().GFile(path, "rb") as f:
        content = f.read()
    if path.endswith(".gz"):
        content = gzip.decompress(content)
    counts.bytes += len(content)
    if not content.strip():
        counts.empty_files += 1
        return
    jsonl = not path.endswith(".txt")
    for number, (offset, raw) in enumerate(_pieces(content, jsonl), start=1):
        if jsonl and not raw.strip():
            continue
        text = _decode(raw, path, offset, bad_utf8, counts)
        if text is not None and jsonl:
            text = _jsonl_text(text, path, number, text_key)
        if text is None:
            continue
        if not jsonl:
            text = text.strip("\n")
        if not text.strip():
            counts.empty_documents += 1
            continue
        counts.documents += 1
        yield text
