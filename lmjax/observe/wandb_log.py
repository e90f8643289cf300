"""Optional Weights & Biases logging (`run.wandb_project`; `pip install 'lmjax[wandb]'`).

The run id is kept in WORKDIR/wandb_run_id, so every restart of a workdir logs into the same
W&B run. Without an API key (WANDB_API_KEY or a `wandb login` entry in ~/.netrc) the run is
written offline under WORKDIR/wandb/ (`wandb sync` uploads it later); WANDB_MODE, when set,
decides instead. wandb writes only local files, so for a gs:// workdir they are written under
$TMPDIR/lmjax-wandb/ and copied to WORKDIR/wandb/ when the writer closes: a preempted VM's
boot disk is gone when the supervisor recreates it, the bucket is not.
"""

from __future__ import annotations

import hashlib
import netrc
import os
import secrets
import tempfile
from typing import Any

from lmjax import storage
from lmjax.config import Config, to_dict
from lmjax.workdir_names import WANDB, WANDB_RUN_ID


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _run_id(workdir: str) -> str:
    """This workdir's W&B run id, created on the first start."""
    path = storage.path(storage.join(workdir, WANDB_RUN_ID))
    if not path.exists():
        path.write_text(secrets.token_hex(6))  # W&B ids: lowercase letters and digits
    return path.read_text().strip()


def _files_dir(workdir: str) -> str:
    """Where wandb keeps its files: WORKDIR/wandb, or for a gs:// workdir (wandb writes
    only local files) a local directory named after the workdir."""
    if not storage.is_url(workdir):
        return workdir
    name = hashlib.sha256(workdir.encode()).hexdigest()[:12]
    local = os.path.join(tempfile.gettempdir(), "lmjax-wandb", name)
    os.makedirs(local, exist_ok=True)  # a local directory by construction
    return local


class WandbWriter:
    """A `MetricsWriter` output: logs the numeric values of every record at its step."""

    def __init__(self, project: str, workdir: str, config: Config):
        import wandb  # config_checks.validate checked that it is installed

        mode: Any = os.environ.get("WANDB_MODE") or ("online" if _has_api_key() else "offline")
        self.workdir = workdir
        self.files_dir = _files_dir(workdir)
        self.run = wandb.init(
            project=project,
            id=_run_id(workdir),
            resume="allow",
            dir=self.files_dir,
            name=config.run.name,
            config=to_dict(config),
            mode=mode,
        )

    def write(self, step: int, record: dict[str, Any]) -> None:
        values = {
            k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
        if storage.is_url(self.workdir):
            local = os.path.join(self.files_dir, WANDB)
            storage.upload_tree(local, storage.join(self.workdir, WANDB))
