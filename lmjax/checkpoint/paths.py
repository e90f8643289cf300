"""Where checkpoints live: the names inside a workdir and inside one step directory."""

from __future__ import annotations

import os

from lmjax.workdir_names import CHECKPOINTS

ITEMS = ("params", "train", "data", "meta")


def absolute(path: str) -> str:
    """orbax wants absolute paths: a local path is made absolute, a URL (gs://...) is kept."""
    return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(absolute(workdir), CHECKPOINTS)
