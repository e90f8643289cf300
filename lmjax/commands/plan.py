"""`lmjax plan`: compile candidate meshes, batches and remat policies, rank those that fit."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from lmjax.config import Config
from lmjax.tools import plan


def main(
    config: Config,
    request: plan.Request,
    presets: dict[str, Any] | None = None,
    as_json: bool = False,
) -> int:
    """Prints the ranked table (or JSON, schema lmjax.tools.plan/1); exit 1 when nothing fits.
    `presets`: {experiment name: ModelConfig}, the model sizes a budget proposal may name."""
    result, text = plan.plan(config, request, presets, progress=_progress_bar(sys.stderr))
    print(json.dumps(result, indent=2) if as_json else text, flush=True)
    return 0 if any(c["fits"] for c in result["candidates"]) else 1


def _progress_bar(stream) -> Callable[[int, int, int], None]:
    """A one-line bar of the compiles done, redrawn in place on a terminal."""
    start = time.monotonic()
    tty = stream.isatty()

    def show(done: int, total: int, failed: int) -> None:
        bar = "#" * (20 * done // total) + "-" * (20 - 20 * done // total)
        line = (
            f"plan [{bar}] {done}/{total} compiled ({failed} failed) "
            f"{time.monotonic() - start:.0f} s"
        )
        print(
            ("\r" if tty else "") + line,
            end="" if tty and done < total else "\n",
            file=stream,
            flush=True,
        )

    return show
