"""The pre-tokenized store: a token stream per split in zarr3 arrays, read by random access.

Layout of a store directory (a local path or gs://BUCKET/PATH), written by `lmjax.data.prepare`
through TensorStore, which reads and writes both natively:
  `SPLIT-IIIII-of-NNNNN/`  input shard I's documents of SPLIT (train, validation), each
      tokenized as BOS text EOS and concatenated, as a 1-D zarr3 array of the token dtype.
      Its objects `c/K` hold tokens [K*O, (K+1)*O) (O = `OBJECT_TOKENS`, a few MiB: few
      objects per shard, few writes to GCS), each cut into records of R = `RECORD_TOKENS`
      with a CRC32C per record and an index (zarr3 `sharding_indexed`): a read fetches the
      index and the byte ranges of the records it overlaps, and damage is a checksum error.
  `shard-IIIII-of-NNNNN.json`  the shard's counts, written after its arrays are complete: a
      rerun of an interrupted preparation redoes only shards without one.
  `store.json`  written last, once every shard is complete (the commit marker): format, token
      dtype, tokenizer fingerprint and each shard's token counts. A directory without it is
      never read.

A split's stream is its shards' streams in shard order. Reading opens no object but the
ones holding the tokens (`store.json` gives every array's shape, so no array metadata is
read), issues every read of a batch at once (many in flight across shards and objects),
bounds each by a timeout and retries it, and names the object when it keeps failing. Memory
is the shard offsets (one integer per shard) plus a bounded cache of object indexes.

On gs://, `STORAGE_EMULATOR_HOST` (the convention of Google's client libraries) points
TensorStore at a GCS emulator (`TENSORSTORE_GCS_HTTP_URL`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from typing import Iterable

import numpy as np
import tensorstore as ts

from lmjax import storage
from lmjax.config import ConfigError
from lmjax.errors import FaultError

FORMAT_VERSION = 2
RECORD_TOKENS = 2048  # small enough that a short window reads little, large enough to index cheaply
OBJECT_TOKENS = 1 << 20  # 2 MiB objects of uint16: one write per MiB on GCS, cheap to list
SPLITS = ("train", "validation")
META = "store.json"
READ_TIMEOUT_S = 60.0  # one read of a batch; then it is retried
READ_TRIES = 4
_MAX_TOKENS = 1 << 40  # the shape arrays are written under, until close() knows the real one
# Errors a retry cannot cure: the object is missing or its bytes are damaged.
_PERMANENT = ("NOT_FOUND", "DATA_LOSS", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE")
_context_lock = threading.Lock()
_contexts: dict[str, ts.Context] = {}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_array(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}"


def shard_meta_file(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.json"


def object_name(directory: str, array: str, position: int, object_tokens: int) -> str:
    """The object of `array` (`shard_array`) that holds its token `position`."""
    return f"{directory.rstrip('/')}/{array}/c/{position // object_tokens}"


def kvstore_spec(directory: str) -> dict:
    """TensorStore kvstore spec of a directory: `gs://BUCKET/PATH` or a local path."""
    if directory.startswith("gs://"):
        storage.follow_emulator()  # TensorStore reads TENSORSTORE_GCS_HTTP_URL when it opens
        bucket, _, path = directory[len("gs://") :].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": path.strip("/") + "/"}
    if "://" in directory:
        raise ConfigError(
            f"store directory {directory!r}: a store lives on a local path or on gs://BUCKET/PATH."
        )
    return {"driver": "file", "path": os.path.abspath(directory) + "/"}


def context() -> ts.Context:
    """This process's TensorStore context: request concurrency, retries and a bounded cache.
    One per GCS endpoint: a context keeps the endpoint its gcs driver first used."""
    endpoint = os.environ.get("TENSORSTORE_GCS_HTTP_URL", "")
    with _context_lock:
        if endpoint not in _contexts:
            _contexts[endpoint] = ts.Context(
                {
                    "cache_pool": {"total_bytes_limit": 64 << 20},  # object indexes, hot records
                    "gcs_request_concurrency": {"limit": 128},
                    "gcs_request_retries": {
                        "max_retries": 4,
                        "initial_delay": "0.1s",
                        "max_delay": "5s",
                    },
                    "file_io_concurrency": {"limit": 64},
                }
            )
        return _contexts[endpoint]


def _kvstore(directory: str) -> ts.KvStore:
    return ts.KvStore.open(kvstore_spec(directory), context=context()).result()


def write_json(path: str, value: dict) -> None:
    """Writes one object whole (TensorStore writes a local file under a lock file, then renames
    it; a GCS object appears whole): readers see all of it or nothing."""
    directory, name = os.path.split(path)
    text = json.dumps(value, indent=1, sort_keys=True)
    _kvstore(directory).write(name, text.encode()).result()


def read_json(path: str) -> dict | None:
    directory, name = os.path.split(path)
    found = _kvstore(directory).read(name).result()
    return json.loads(found.value) if found.state == "value" else None


def delete_shard(directory: str, index: int, count: int) -> None:
    """Removes shard `index`'s arrays (a failed or damaged preparation of it)."""
    kv = _kvstore(directory)
    for split in SPLITS:
        prefix = shard_array(split, index, count) + "/"
        kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()  # "0" follows "/"


def _array_spec(directory: str, array: str, dtype: np.dtype, n: int, layout: tuple[int, int]):
    """zarr3 spec of a 1-D token array of length n; layout: (object_tokens, record_tokens)."""
    record = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    return {
        "driver": "zarr3",
        "kvstore": kvstore_spec(os.path.join(directory, array)),
        "fill_missing_data_reads": False,  # a missing object is an error, never zeros
        "metadata": {
            "shape": [n],
            "data_type": np.dtype(dtype).name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [layout[0]]}},
            "chunk_key_encoding": {"name": "default"},
            "fill_value": 0,
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": [layout[1]],
                        "codecs": record,
                        "index_codecs": record,
                    },
                }
            ],
        },
    }


class TokenWriter:
    """Appends token arrays to one shard's SPLIT array, one whole object per write.

    close() fixes the array's length and returns {"tokens", "records"}. Opening deletes what
    an interrupted attempt left in the array.
    """

    def __init__(self, directory: str, split: str, index: int, count: int, dtype: np.dtype):
        self._layout = layout()
        spec = _array_spec(
            directory, shard_array(split, index, count), dtype, _MAX_TOKENS, self._layout
        )
        self._array = ts.open(spec, create=True, delete_existing=True, context=context()).result()
        self._dtype = dtype
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self.tokens = 0  # added so far
        self._written = 0

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(tokens.astype(self._dtype, copy=False))
        self._pending_tokens += len(tokens)
        self.tokens += len(tokens)
        if self._pending_tokens >= self._layout[0]:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        size = self._layout[0]
        flat = np.concatenate(self._pending) if self._pending else np.empty(0, self._dtype)
        full = len(flat) if final else len(flat) // size * size
        for start in range(0, full, size):
            piece = flat[start : min(start + size, full)]
            self._array[self._written : self._written + len(piece)].write(piece).result()
            self._written += len(piece)
        rest = flat[full:]
        self._pending, self._pending_tokens = [rest], len(rest)

    def close(self) -> dict:
        self._flush(final=True)
        self._array.resize(exclusive_max=[self.tokens], resize_metadata_only=True).result()
        return {"tokens": self.tokens, "records": -(-self.tokens // self._layout[1])}


def layout() -> tuple[int, int]:
    """(object_tokens, record_tokens) a new store is written with (store.json records them)."""
    return OBJECT_TOKENS, RECORD_TOKENS


def _permanent(error: Exception) -> bool:
    return str(error).startswith(_PERMANENT)


class StoreSplit:
    """Random access to one split's token stream: `read(starts, length)` -> [len(starts), length].

    Opens nothing at construction: each shard's array is opened on first use, from the shape
    `store.json` gives (no request), and kept (a handle holds no buffers).
    """

    def __init__(self, directory: str, split: str, meta: dict):
        self.directory = directory
        self.split = split
        self.dtype = np.dtype(meta["dtype"])
        self.layout = (int(meta["object_tokens"]), int(meta["record_tokens"]))
        self._count = len(meta["shards"])
        self.shard_tokens = np.array([s[split]["tokens"] for s in meta["shards"]], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_tokens)])
        self._arrays: dict[int, ts.TensorStore] = {}
        self._lock = threading.Lock()

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def _array(self, shard: int) -> ts.TensorStore:
        with self._lock:
            if shard not in self._arrays:
                array = shard_array(self.split, shard, self._count)
                n = int(self.shard_tokens[shard])
                spec = _array_spec(self.directory, array, self.dtype, n, self.layout)
                self._arrays[shard] = ts.open(
                    spec, open=True, assume_metadata=True, read=True, context=context()
                ).result()
            return self._arrays[shard]

    def _pieces(self, start: int, length: int):
        """(shard, first, last) local slices covering stream positions [start, start+length)."""
        pos, end = start, start + length
        while pos < end:
            shard = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[shard])
            take = min(end - pos, int(self.shard_tokens[shard]) - local)
            yield shard, local, local + take
            pos += take

    def damage_message(self, shard: int, first: int, last: int, error: str) -> str:
        """One line: which object failed and how to redo only its shard."""
        array = shard_array(self.split, shard, self._count)
        objects = sorted(
            {object_name(self.directory, array, p, self.layout[0]) for p in (first, last - 1)}
        )
        record = os.path.join(self.directory, shard_meta_file(shard, self._count))
        return (
            f"store object {' and '.join(objects)} (tokens [{first}, {last}) of input shard "
            f"{shard}) cannot be read: {error.splitlines()[0]}. If it is damaged, delete "
            f"{record} and run `lmjax data prepare` with the run's settings: it redoes only "
            f"that shard (`lmjax data verify {self.directory}` checks every shard)."
        )

    def fetch(self, pieces: Iterable[tuple[int, int, int]]) -> dict[tuple, np.ndarray]:
        """{(shard, first, last): its tokens}, every read in flight at once, each bounded by
        READ_TIMEOUT_S and retried up to READ_TRIES times (a missing or damaged object not):
        a FaultError naming the object when one keeps failing."""
        pending = {p: self._array(p[0])[p[1] : p[2]].read() for p in pieces}
        fetched = {}
        for piece, future in pending.items():
            for attempt in range(1, READ_TRIES + 1):
                try:
                    fetched[piece] = future.result(timeout=READ_TIMEOUT_S)
                    break
                except (ValueError, TimeoutError) as e:
                    future.cancel()
                    if attempt == READ_TRIES or _permanent(e):
                        message = str(e) or f"no answer within {READ_TIMEOUT_S:.0f} s"
                        raise FaultError(self.damage_message(*piece, message)) from None
                    time.sleep(0.1 * 2**attempt)
                    future = self._array(piece[0])[piece[1] : piece[2]].read()
        return fetched

    def read(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens at stream positions [s, s+length) for each s in `starts` -> int32 [n, length]."""
        if len(starts) and (min(starts) < 0 or max(starts) + length > self.n_tokens):
            raise ValueError(
                f"positions [{min(starts)}, {max(starts) + length}) outside the "
                f"{self.split} stream of {self.n_tokens} tokens"
            )
        row_pieces = [list(self._pieces(int(s), length)) for s in starts]
        fetched = self.fetch({p for pieces in row_pieces for p in pieces})
        out = np.empty((len(starts), length), np.int32)
        for row, pieces in enumerate(row_pieces):
            out[row] = np.concatenate([fetched[p] for p in pieces])
        return out

    def objects(self) -> list[tuple[int, int, int]]:
        """(shard, first, last) of every object of the split, in stream order."""
        size = self.layout[0]
        return [
            (shard, first, min(first + size, int(n)))
            for shard, n in enumerate(self.shard_tokens)
            for first in range(0, int(n), size)
        ]


def verify(directory: str, vocab_size: int, workers: int = 16) -> dict[int, str]:
    """Reads every record of the store at `directory` (checksums checked), `workers` objects
    at a time: {input shard: the first problem found in it}; empty when the store is sound."""
    meta = open_store(directory)
    splits = [StoreSplit(directory, split, meta) for split in SPLITS]

    def check(job: tuple[StoreSplit, tuple[int, int, int]]) -> tuple[int, str] | None:
        split, (shard, first, last) = job
        try:
            tokens = split.fetch([(shard, first, last)])[shard, first, last]
        except FaultError as e:
            return shard, str(e)
        if len(tokens) and int(tokens.max()) >= vocab_size:
            message = f"token {int(tokens.max())} >= vocabulary size {vocab_size}"
            return shard, split.damage_message(shard, first, last, message)
        return None

    jobs = [(split, piece) for split in splits for piece in split.objects()]
    problems: dict[int, str] = {}
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="lmjax-verify") as pool:
        for found in pool.map(check, jobs):
            if found is not None:
                problems.setdefault(*found)
    return dict(sorted(problems.items()))


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
