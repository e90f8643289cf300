"""The checks of `lmjax doctor` and `lmjax smoke`: one `Check` a line, each failure saying what
to look at."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass
class Check:
    """One line of a report: what was checked, whether it passed, and what was seen."""

    name: str
    ok: bool
    detail: str
    applicable: bool = True  # False: nothing to check here (it passes, and says so: [N/A])


def guard(name: str, hint: str, fn: Callable[[], Check]) -> Check:
    """`fn()`, or a failed check named `name` that gives the exception and where to look."""
    try:
        return fn()
    except Exception as e:  # every failure becomes a reported check
        return Check(name, False, f"{type(e).__name__}: {e} -> {hint}")


def lines(checks: list[Check]) -> list[str]:
    """A "[PASS] name: detail", "[FAIL] name: detail" or "[N/A] name: detail" line per check."""
    return [
        f"  [{'N/A' if not c.applicable else 'PASS' if c.ok else 'FAIL'}] {c.name}: {c.detail}"
        for c in checks
    ]
