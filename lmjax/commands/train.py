"""`lmjax train`: joins the job's processes, runs the preflight checks (`lmjax doctor`'s), then
trains (or resumes) a run in its workdir."""

from __future__ import annotations

from lmjax.config import Config
from lmjax.parallel import distributed
from lmjax.tools import doctor
from lmjax.train import run


def main(
    config: Config, workdir: str, restore_from: str | None = None, init_from: str | None = None
) -> int:
    """Prints the final losses (and the end-of-run sample); see `run.train` for the rest."""
    started = distributed.initialize()
    doctor.preflight(config, workdir, started.num_processes)
    result = run.train(config, workdir, restore_from=restore_from, init_from=init_from)
    print(" ".join(f"{k}={v:.4g}" for k, v in result.items() if k.startswith(("loss", "eval"))))
    if "sample" in result:
        print(f"sample: {result['sample']}")
    return 0
