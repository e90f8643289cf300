"""Writes a seeded benchmark corpus of about SIZE_MB from the packaged plays (for the README's
data figures): FILES `.txt` files of form-feed separated documents, each document a packaged
document (a scene or a sonnet) drawn at random, with a numbered title line so no two are equal.

    python scripts/make_bench_corpus.py --out /tmp/corpus_1g --size-mb 1000 --files 64
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from lmjax.data import documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size-mb", type=float, default=1000.0)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = [d for f in documents.packaged_files() for d in documents.read_documents(f)]
    rng = np.random.default_rng(args.seed)
    per_file = int(args.size_mb * 1e6 / args.files)
    os.makedirs(args.out, exist_ok=True)
    number = 0
    for i in range(args.files):
        with open(os.path.join(args.out, f"part-{i:04d}.txt"), "w", encoding="utf-8") as f:
            written = 0
            while written < per_file:
                text = (
                    f"{'' if written == 0 else documents.DOCUMENT_SEPARATOR}#{number}\n"
                    f"{docs[rng.integers(len(docs))]}"
                )
                f.write(text)
                written += len(text.encode())
                number += 1
    print(f"{number} documents in {args.files} files under {args.out}")


if __name__ == "__main__":
    main()
