"""The pre-tokenized store: a token stream per split in ArrayRecord files, read by random access.

Layout of a store directory (local or gs://), written by `lmjax.data.prepare`:
  `SPLIT-IIIII-of-NNNNN.array_record`  input shard I's documents of SPLIT (train, validation),
      each tokenized as BOS text EOS and concatenated; record r holds stream tokens
      [r*R, (r+1)*R) of the shard (R = `record_tokens`; only the last record is shorter).
  `shard-IIIII-of-NNNNN.json`  the shard's counts, written after its ArrayRecord files are
      complete: a rerun of an interrupted preparation redoes only shards without one.
  `store.json`  written last, once every shard is complete (the commit marker): format, token
      dtype, tokenizer fingerprint and each shard's token and record counts. A directory
      without it is never read.

A split's stream is its shards' streams in shard order. Reading a window needs the shard
offsets (one integer per shard) and the records it overlaps: memory does not grow with the
number of tokens, and ArrayRecord indexes stay on disk (`index_storage_option:offloaded`).
"""

from __future__ import annotations

import collections
import json
import os
import threading

import numpy as np

from lmjax.config import ConfigError
from lmjax.data import documents

FORMAT_VERSION = 1
RECORD_TOKENS = 2048  # small enough that a short window reads little, large enough to index cheaply
SPLITS = ("train", "validation")
META = "store.json"
_WRITER_OPTIONS = "group_size:1"  # every record its own chunk: random access decodes one record
_READER_OPTIONS = "readahead_buffer_size:0,index_storage_option:offloaded,footer_prefetch_bytes:0"
_OPEN_READERS = 64  # per split; a reader holds buffers, not the file's index


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_file(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def shard_meta_file(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.json"


def write_json_atomic(path: str, value: dict) -> None:
    """Writes under a temporary name, then renames: readers see all of it or nothing."""
    io = documents.gfile()
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with io.GFile(tmp, "w") as f:
        f.write(json.dumps(value, indent=1, sort_keys=True))
    io.rename(tmp, path, overwrite=True)


def read_json(path: str) -> dict | None:
    io = documents.gfile()
    if not io.exists(path):
        return None
    with io.GFile(path, "r") as f:
        return json.loads(f.read())


class RecordWriter:
    """Cuts a stream of token arrays into records of `RECORD_TOKENS` in one ArrayRecord file.

    Written under a temporary name; `close()` renames it into place and returns
    {"tokens", "records"}.
    """

    def __init__(self, path: str, dtype: np.dtype):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = path
        self._tmp = f"{path}.tmp-{os.getpid()}"
        self._writer = ArrayRecordWriter(self._tmp, _WRITER_OPTIONS)
        self._dtype = dtype
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.tokens = 0
        self.records = 0

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(tokens.astype(self._dtype, copy=False))
        self._pending_tokens += len(tokens)
        self.tokens += len(tokens)
        if self._pending_tokens >= RECORD_TOKENS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        flat = np.concatenate(self._pending) if self._pending else np.empty(0, self._dtype)
        full = len(flat) // RECORD_TOKENS * RECORD_TOKENS
        for start in range(0, full, RECORD_TOKENS):
            self._writer.write(flat[start : start + RECORD_TOKENS].tobytes())
        self.records += full // RECORD_TOKENS
        rest = flat[full:]
        if final and len(rest):
            self._writer.write(rest.tobytes())
            self.records += 1
            rest = rest[:0]
        self._pending, self._pending_tokens = [rest], len(rest)

    def close(self) -> dict:
        self._flush(final=True)
        self._writer.close()
        documents.gfile().rename(self._tmp, self.path, overwrite=True)
        return {"tokens": self.tokens, "records": self.records}


class StoreSplit:
    """Random access to one split's token stream: `read(starts, length)` -> [len(starts), length].

    Opens `store.json` only; each shard's ArrayRecord file is opened on first use (at most
    `_OPEN_READERS` at once) and checked against the record count `store.json` gives.
    """

    def __init__(self, directory: str, split: str, meta: dict):
        self.directory = directory
        self.split = split
        self.dtype = np.dtype(meta["dtype"])
        self.record_tokens = int(meta["record_tokens"])
        self._count = len(meta["shards"])
        self._records = [int(s[split]["records"]) for s in meta["shards"]]
        self.shard_tokens = np.array([s[split]["tokens"] for s in meta["shards"]], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_tokens)])
        self._readers: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def _reader(self, shard: int):
        with self._lock:
            if shard in self._readers:
                self._readers.move_to_end(shard)
                return self._readers[shard]
        from array_record.python.array_record_module import ArrayRecordReader

        path = os.path.join(self.directory, shard_file(self.split, shard, self._count))
        if not documents.gfile().exists(path):
            raise ConfigError(
                f"store file {path} is missing: the store is damaged; delete "
                f"{self.directory} and run `lmjax data prepare` again."
            )
        reader = ArrayRecordReader(path, _READER_OPTIONS)
        found = reader.num_records() if reader.ok() else -1
        if found != self._records[shard]:
            raise ConfigError(
                f"store file {path} holds {max(found, 0)} records but {META} says "
                f"{self._records[shard]}: it is truncated or was replaced; delete "
                f"{self.directory} and run `lmjax data prepare` again."
            )
        with self._lock:
            self._readers[shard] = reader
            while len(self._readers) > _OPEN_READERS:
                self._readers.popitem(last=False)
        return reader

    def _pieces(self, start: int, length: int):
        """(shard, record, first, last) slices covering stream positions [start, start+length)."""
        pos, end = start, start + length
        while pos < end:
            shard = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[shard])
            record, first = divmod(local, self.record_tokens)
            take = min(end - pos, self.record_tokens - first, int(self.shard_tokens[shard]) - local)
            yield shard, record, first, first + take
            pos += take

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens at stream positions [s, s+length) for each s in `starts` -> int32 [n, length]."""
        if len(starts) and (min(starts) < 0 or max(starts) + length > self.n_tokens):
            raise ValueError(
                f"positions [{min(starts)}, {max(starts) + length}) outside the "
                f"{self.split} stream of {self.n_tokens} tokens"
            )
        plan = [list(self._pieces(int(s), length)) for s in starts]
        wanted: dict[int, set[int]] = collections.defaultdict(set)
        for pieces in plan:
            for shard, record, _, _ in pieces:
                wanted[shard].add(record)
        fetched = {}
        for shard, records in wanted.items():
            order = sorted(records)
            for record, raw in zip(order, self._reader(shard).read(order)):
                fetched[shard, record] = np.frombuffer(raw, self.dtype)
        out = np.empty((len(starts), length), np.int32)
        for row, pieces in enumerate(plan):
            out[row] = np.concatenate([fetched[s, r][a:b] for s, r, a, b in pieces])
        return out


def open_store(directory: str) -> dict:
    """The committed `store.json` of `directory`; ConfigError when there is none."""
    meta = read_json(os.path.join(directory, META))
    if meta is None:
        raise ConfigError(
            f"no prepared store at {directory} ({META} is missing: preparation "
            "never ran or did not finish): run `lmjax data prepare` with the run's "
            "experiment and settings."
        )
    if meta.get("format") != FORMAT_VERSION:
        raise ConfigError(
            f"store {directory} has format {meta.get('format')}, this lmjax reads "
            f"{FORMAT_VERSION}: prepare it again."
        )
    return meta
