"""Input formats (.txt, .jsonl, gzip, zstd, Parquet), streamed and cut into parts: the same
corpus in every format, in any number of files or parts, gives the same documents, the same
counts and the same validation split; reading holds a chunk, never the file."""

import tracemalloc

from lmjax.data import documents
from tests.unit.test_inputs import write


def test_reading_holds_a_chunk_not_the_file(tmp_path, monkeypatch):
    """tracemalloc's peak while reading an 8 MB file: a few chunks (or batches), not the file."""
    monkeypatch.setattr(documents, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(documents, "PARQUET_ROWS", 64)
    texts = [f"document {i} " + "words " * 150 for i in range(9000)]
    for form in ("txt", "jsonl.gz", "jsonl.zst", "parquet"):
        path = str(tmp_path / f"big.{form}")
        write(path, form, texts, row_group=1000)
        documents.read_documents(path).__next__()  # imports and first-use allocations
        tracemalloc.start()
        n = sum(1 for _ in documents.read_documents(path))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert n == len(texts)
        assert peak < 1e6, (form, peak)  # the file is 8.2 MB
