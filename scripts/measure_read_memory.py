"""Peak RSS of reading every document of one input file with `lmjax.data.documents` (the
lmjax that PYTHONPATH names, so two checkouts compare), for the README's streaming figure:

    PYTHONPATH=. python scripts/measure_read_memory.py /tmp/big.txt
"""

from __future__ import annotations

import resource
import sys
import time

from lmjax.data import documents


def main() -> None:
    documents.gfile()  # TensorFlow's import, before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    n = sum(1 for _ in documents.read_documents(sys.argv[1]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"{sys.argv[1]}: {n} documents in {time.perf_counter() - start:.1f} s; peak RSS "
        f"{peak / 1024:.0f} MB (after imports {base / 1024:.0f} MB)"
    )


if __name__ == "__main__":
    main()
