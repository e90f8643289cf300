"""`lmjax plan`: compile candidate meshes, batches and remat policies, rank those that fit."""

from __future__ import annotations

import json
from typing import Any

from lmjax import plan
from lmjax.config import Config


def main(
    config: Config,
    request: plan.Request,
    presets: dict[str, Any] | None = None,
    as_json: bool = False,
) -> int:
    """Prints the ranked table (or JSON, schema lmjax.plan/1); exit 1 when nothing fits.
    `presets`: {experiment name: ModelConfig}, the model sizes a budget proposal may name."""
    result, text = plan.plan(config, request, presets)
    print(json.dumps(result, indent=2) if as_json else text, flush=True)
    return 0 if any(c["fits"] for c in result["candidates"]) else 1
