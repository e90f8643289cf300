"""Documents of text corpora: which files a source names, how a file is cut into shards, and
its documents, read as a stream.

File formats, local or `gs://` (read through `lmjax.storage`):
  * `.txt`: documents are separated by a form feed (`\\f`); a file without one is one document.
  * `.jsonl`: one JSON object per line, the text under a configurable key (data.text_feature).
  * either compressed: `.txt.gz`, `.txt.zst`, `.jsonl.gz`, `.jsonl.zst` (gzip, zstandard).
  * `.parquet`: one document per row, the text in a configurable column (string or binary).

Every format is streamed: reading holds a chunk of `CHUNK_BYTES` and the longest document
(Parquet: a batch of `PARQUET_ROWS` rows), never the file. A file is cut into parts that
separate workers read (`file_parts`): an uncompressed `.txt`/`.jsonl` file into byte ranges of
about `PART_BYTES`, a Parquet file into its row groups; a compressed file is one part (a gzip
or zstd stream cannot be entered in the middle). A byte range [start, stop) holds the
documents (lines) that begin in it, so the ranges of a file hold each document once.

The same policy in every format: bytes that are not UTF-8 are an error naming the file and
the byte (in the decompressed stream) or row, or with data.bad_utf8=skip their document is
skipped and counted; an empty (whitespace) document is skipped and counted, and a whole file
without any content is counted as an empty file (a part of a split file counts its blank
documents). Blank `.jsonl` lines are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import os
from typing import IO, Iterator, cast

import zstandard

from lmjax import storage
from lmjax.config import ConfigError

SUFFIXES = (
    ".txt",
    ".txt.gz",
    ".txt.zst",
    ".jsonl",
    ".jsonl.gz",
    ".jsonl.zst",
    ".parquet",
)
FORMATS = ".txt, .jsonl (either also .gz or .zst) or .parquet"
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
DOCUMENT_SEPARATOR = "\f"
CHUNK_BYTES = 1 << 20  # read at a time from a (decompressed) stream
PARQUET_ROWS = 1024  # rows decoded at a time
PART_BYTES = 256 << 20  # an uncompressed text file larger than this is read in byte ranges


def file_format(path: str) -> str:
    """ "txt", "jsonl" or "parquet": what a file of `SUFFIXES` holds, compressed or not."""
    stem = path.removesuffix(".gz").removesuffix(".zst")
    return os.path.splitext(stem)[1][1:]


def expand_files(spec: str, *, what: str = "data.text_files") -> list[str]:
    """Sorted text files named by `spec`: comma-separated directories or globs."""
    files: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if storage.path(item).is_dir():
            matched = [
                p for suffix in SUFFIXES for p in storage.glob(storage.join(item, "*" + suffix))
            ]
        else:
            matched = storage.glob(item)
        if not matched:
            raise ConfigError(
                f"{what}={item!r} matched no files: give an existing directory or a glob "
                f"of {FORMATS} files, e.g. /data/books/*.txt"
            )
        files.extend(matched)
    if not files:
        raise ConfigError(f"{what} is empty: give a directory or a glob of {FORMATS} files.")
    bad = [f for f in files if not f.endswith(SUFFIXES)]
    if bad:
        raise ConfigError(
            f"{what} names unsupported files {bad[:3]}: only {FORMATS} files are read "
            "(.txt: documents split by form feeds; .jsonl: one JSON object per line)."
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
    data = storage.path(path).read_bytes()
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
    """What reading saw besides documents: skipped items and input bytes (of the
    decompressed stream; of the texts for Parquet)."""

    documents: int = 0
    bytes: int = 0
    empty_documents: int = 0
    empty_files: int = 0
    bad_utf8: int = 0

    def add(self, other: "ReadCounts") -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


# ---------------------------------------------------------------- parts of a file


class _RandomAccess(io.RawIOBase):
    """A file of `lmjax.storage` (fsspec's) as a standard seekable binary file (what pyarrow
    reads)."""

    def __init__(self, f):
        self._f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._f.seek(offset, whence)
        return self._f.tell()

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer) -> int:
        data = self._f.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def _parquet(path: str) -> Iterator:
    import pyarrow.parquet as pq

    with storage.path(path).open("rb") as f:
        try:
            # Column chunks are read through a buffer, not loaded whole (pre_buffer off).
            pf = pq.ParquetFile(_RandomAccess(f), buffer_size=1 << 20, pre_buffer=False)
        except ValueError as e:  # pyarrow.ArrowInvalid
            raise ConfigError(f"{path} is not a Parquet file ({e}).") from None
        yield pf


def file_parts(path: str, size: int) -> list[tuple[int, int]]:
    """[(start, stop)] parts of a file of `size` bytes that workers read separately (module
    docstring): byte ranges of an uncompressed text file, row groups of a Parquet file
    (stop -1: to the end)."""
    part_bytes = PART_BYTES
    if file_format(path) == "parquet":
        with _parquet(path) as pf:
            groups = pf.num_row_groups
        return [(g, g + 1) for g in range(groups - 1)] + [(max(groups - 1, 0), -1)]
    if path.endswith((".gz", ".zst")) or size <= part_bytes:
        return [(0, -1)]
    n = -(-size // part_bytes)
    bounds = [size * i // n for i in range(n)] + [-1]
    return list(zip(bounds[:-1], bounds[1:]))


# ---------------------------------------------------------------- reading


@contextlib.contextmanager
def _stream(path: str, start: int) -> Iterator[IO[bytes]]:
    """The (decompressed) bytes of a file from byte `start` (uncompressed files only seek)."""
    with storage.path(path).open("rb") as raw:
        if path.endswith(".gz"):
            yield cast(IO[bytes], gzip.GzipFile(fileobj=raw))
        elif path.endswith(".zst"):
            with zstandard.ZstdDecompressor().stream_reader(
                raw, read_across_frames=True, closefd=False
            ) as stream:
                yield stream
        else:
            raw.seek(start)
            yield raw


def _pieces(stream: IO[bytes], sep: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each `sep`-separated piece of `stream`, whose first byte is at
    `offset`. Reads `CHUNK_BYTES` at a time and keeps only the piece being read."""
    pending: list[bytes] = []
    while chunk := stream.read(CHUNK_BYTES):
        parts = chunk.split(sep)
        if len(parts) > 1:
            parts[0] = b"".join(pending) + parts[0]
            pending = []
            for piece in parts[:-1]:
                yield offset, piece
                offset += len(piece) + 1
        pending.append(parts[-1])
    yield offset, b"".join(pending)


def _byte_units(
    path: str, sep: bytes, start: int, stop: int, counts: ReadCounts
) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of the pieces that begin in [start, stop) (stop -1: the end).

    A form feed and a newline are single bytes that never occur inside a UTF-8 sequence, so
    pieces split before decoding. The piece holding byte start - 1 began before `start`: the
    previous range reads it."""
    origin = max(start - 1, 0)
    with _stream(path, origin) as stream:
        pieces = _pieces(stream, sep, origin)
        if start > 0:
            next(pieces)
        owned = False
        for offset, raw in pieces:
            if 0 <= stop <= offset:
                return
            counts.bytes += len(raw) + 1
            owned = True
            yield offset, raw
    if owned:  # this range holds the file's last piece, which has no separator after it
        counts.bytes -= 1


def _parquet_units(
    path: str, column: str, start: int, stop: int, counts: ReadCounts
) -> Iterator[tuple[int, bytes]]:
    """(row number, text bytes) of each row of row groups [start, stop); a null text is b""."""
    import pyarrow as pa

    with _parquet(path) as pf:
        schema = pf.schema_arrow
        if column not in schema.names:
            raise ConfigError(
                f"{path} has no column {column!r} (it has {schema.names}): set "
                "data.text_feature to the column holding the document text."
            )
        kind = schema.field(column).type
        if not any(
            is_(kind) for is_ in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary)
        ):
            raise ConfigError(
                f"{path}: column {column!r} holds {kind}, not text: set data.text_feature "
                "to a string column."
            )
        groups = list(range(pf.num_row_groups))[start : stop if stop >= 0 else None]
        row = sum(pf.metadata.row_group(g).num_rows for g in range(start))
        batches = pf.iter_batches(PARQUET_ROWS, groups, [column], use_threads=False)
        for batch in batches if groups else ():
            for value in batch.column(0).cast(pa.large_binary()).to_pylist():
                raw = value or b""
                counts.bytes += len(raw)
                yield row, raw
                row += 1


def _decode(
    raw: bytes, path: str, location: int, form: str, bad_utf8: str, counts: ReadCounts
) -> str | None:
    """`raw` as text; None (counted) for bytes that are not UTF-8 under data.bad_utf8=skip.
    `location`: the unit's byte offset in the (decompressed) file, or its Parquet row."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if bad_utf8 == "skip":
            counts.bad_utf8 += 1
            return None
        where = (
            f"row {location}, byte {e.start} of its text"
            if form == "parquet"
            else f"byte {location + e.start}"
        )
        raise ConfigError(
            f"{path}: {where} is not UTF-8 ({e.reason}): fix the file, or set "
            "data.bad_utf8=skip to skip such documents and count them."
        ) from None


def _jsonl_text(line: str, path: str, offset: int, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: the line at byte {offset} is not valid JSON ({e}); .jsonl files hold "
            "one JSON object per line."
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ConfigError(
            f"{path}: the line at byte {offset} has no string field {text_key!r} (found "
            f"{keys}): set data.text_feature to the key holding the document text."
        )
    return record[text_key]


def read_documents(
    path: str,
    text_key: str = "text",
    *,
    start: int = 0,
    stop: int = -1,
    bad_utf8: str = "error",
    counts: ReadCounts | None = None,
) -> Iterator[str]:
    """Yields the non-empty documents of a file, or of its part [start, stop) (`file_parts`),
    in file order, by the policy of the module docstring; tallies skipped items in `counts`."""
    counts = counts if counts is not None else ReadCounts()
    form = file_format(path)
    units = (
        _parquet_units(path, text_key, start, stop, counts)
        if form == "parquet"
        else _byte_units(path, b"\n" if form == "jsonl" else b"\f", start, stop, counts)
    )
    empty, content, whole = 0, False, start == 0 and stop < 0
    for location, raw in units:
        if form != "parquet" and not raw.strip():
            empty += form == "txt"  # a blank .jsonl line is no document
            continue
        content = True
        text = _decode(raw, path, location, form, bad_utf8, counts)
        if text is None:
            continue
        if form == "jsonl":
            text = _jsonl_text(text, path, location, text_key)
        elif form == "txt":
            text = text.strip("\n")
        if not text.strip():
            empty += 1
            continue
        counts.documents += 1
        yield text
    if whole and not content:
        counts.empty_files += 1
    else:
        counts.empty_documents += empty
