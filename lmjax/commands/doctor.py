"""`lmjax doctor`: joins the job's processes, runs the preflight checks of `lmjax train`
(`lmjax.tools.doctor`) and prints them; exit 0 when all pass."""

from __future__ import annotations

from lmjax.config import Config
from lmjax.parallel import distributed
from lmjax.tools import checklist, doctor


def main(config: Config, workdir: str = "", expect_platform: str = "") -> int:
    started = distributed.initialize()
    checks = doctor.run_checks(config, workdir, started.num_processes, expect_platform)
    failed = sum(not c.ok for c in checks)
    print("\n".join(["lmjax doctor report", *checklist.lines(checks)]))
    print(f"{failed} check(s) FAILED" if failed else "all checks passed", flush=True)
    return 1 if failed else 0
