"""`lmjax soak`: SIGKILL training at chosen moments, resume, and count the bitwise-equal runs."""

from __future__ import annotations

from lmjax import storage
from lmjax.tools import soak


def main(
    root: str, trials: int, experiment: str, overrides: list[str], steps: int, seed: int
) -> int:
    """Prints one line per trial and `N/N trials resumed bit for bit`; exit 1 unless all did."""
    rows = soak.soak(
        storage.path(root),
        trials,
        experiment,
        overrides,
        steps=steps,
        seed=seed,
        on_trial=lambda i, row: print(soak.format_row(i, row), flush=True),
    )
    passed = sum(r["ok"] for r in rows)
    cut = sum(r["save_cut"] for r in rows)
    print(f"{passed}/{len(rows)} trials resumed bit for bit ({cut} kills cut a save in flight)")
    return 0 if passed == len(rows) else 1
