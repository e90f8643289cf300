"""`lmjax checkpoint list|export`: what a run has saved, and params-only copies of it."""

from __future__ import annotations

from lmjax.checkpoint import listing


def list_steps(workdir: str, as_json: bool = False) -> int:
    """Prints every step with its size, completeness and metadata (a table or JSON)."""
    rows = listing.list_checkpoints(workdir)
    print(listing.json_summary(rows) if as_json else listing.format_listing(rows))
    return 0


def export(workdir: str, step: int | None, out: str) -> int:
    """Writes OUT/params and OUT/model_config.json from a step (default: the newest)."""
    print(listing.export_params(workdir, step, out))
    return 0
