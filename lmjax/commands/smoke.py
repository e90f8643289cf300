"""`lmjax smoke`: is this machine ready to train? The checks of `lmjax.tools.smoke`, and the report."""

from __future__ import annotations

import tempfile

from lmjax.config import Config
from lmjax.parallel import distributed
from lmjax.tools import smoke


def main(config: Config, steps: int, workdir: str = "", expect_platform: str = "") -> int:
    """Joins the job's processes, runs the checks (in a new temporary directory unless
    `workdir`), prints the report; exit 0 when all pass."""
    distributed.initialize()
    workdir = workdir or tempfile.mkdtemp(prefix="lmjax-smoke-")
    checks = smoke.run_checks(config, steps, workdir, expect_platform)
    print(smoke.report(checks, workdir))
    return 0 if all(c.ok for c in checks) else 1
