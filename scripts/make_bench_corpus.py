"""Writes a seeded benchmark corpus of about SIZE_MB from the packaged plays (for the README's
data figures): FILES files of each format in FORMATS, each document a packaged document (a
scene or a sonnet) drawn at random, with a numbered title line so no two are equal. Every
format holds the same documents in the same files: OUT/FORMAT/part-IIII.FORMAT.

    python scripts/make_bench_corpus.py --out /tmp/corpus_1g --size-mb 1000 --files 64
    python scripts/make_bench_corpus.py --out /tmp/c --size-mb 300 --files 8 \\
        --formats txt,jsonl.gz,jsonl.zst,parquet

`--formats txt` (the default) writes OUT/part-IIII.txt, as before formats existed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from lmjax.data import documents

PARQUET_ROW_GROUP = 2048  # rows; about 7 MB of text in this corpus


@contextlib.contextmanager
def writer(path: str, form: str) -> Iterator:
    """A function that writes one document to `path` in format `form`."""
    if form == "parquet":
        rows: list[str] = []
        with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as out:

            def add(text: str) -> None:
                rows.append(text)
                if len(rows) == PARQUET_ROW_GROUP:
                    out.write_table(pa.table({"text": rows}))
                    rows.clear()

            yield add
            if rows:
                out.write_table(pa.table({"text": rows}))
        return
    if form.endswith(".gz"):
        f = gzip.open(path, "wt", encoding="utf-8", compresslevel=6)
    elif form.endswith(".zst"):
        f = zstandard.open(path, "wt", encoding="utf-8")
    else:
        f = open(path, "w", encoding="utf-8")
    first = [True]
    with f:

        def add(text: str) -> None:
            if form.startswith("jsonl"):
                f.write(json.dumps({"text": text}) + "\n")
            else:
                f.write(text if first[0] else documents.DOCUMENT_SEPARATOR + text)
            first[0] = False

        yield add


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size-mb", type=float, default=1000.0)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default="txt", help="comma-separated: txt, jsonl.gz, ...")
    args = parser.parse_args()
    forms = args.formats.split(",")
    docs = [d for f in documents.packaged_files() for d in documents.read_documents(f)]
    rng = np.random.default_rng(args.seed)
    per_file = int(args.size_mb * 1e6 / args.files)
    dirs = {f: args.out if forms == ["txt"] else os.path.join(args.out, f) for f in forms}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    number = 0
    for i in range(args.files):
        with contextlib.ExitStack() as stack:
            adds = [
                stack.enter_context(writer(os.path.join(dirs[f], f"part-{i:04d}.{f}"), f))
                for f in forms
            ]
            written = 0
            while written < per_file:
                text = f"#{number}\n{docs[rng.integers(len(docs))]}"
                for add in adds:
                    add(text)
                written += len(text.encode()) + (written > 0)  # and the .txt separator
                number += 1
    print(f"{number} documents in {args.files} files of {forms} under {args.out}")


if __name__ == "__main__":
    main()
