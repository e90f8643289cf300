"""JAX's persistent compilation cache, so a restarted run (or a second benchmark) loads its
compiled steps instead of compiling them again.

`run.compile_cache_dir`: "auto" (the default) uses $JAX_COMPILATION_CACHE_DIR when set,
else $XDG_CACHE_HOME/lmjax/jax-compile (~/.cache/... without it); "" turns the cache off;
anything else is the directory, local or gs:// (on a pod, a bucket every host can read).
jax caches only computations that took longer than
`jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

from lmjax import storage

log = logging.getLogger("lmjax")


def resolve(setting: str) -> str | None:
    """The directory `setting` names (None: the cache is off)."""
    if not setting:
        return None
    if setting != "auto":
        return setting if "://" in setting else os.path.abspath(os.path.expanduser(setting))
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "lmjax", "jax-compile")


def _use(path: str | None) -> None:
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # jax opens the cache once; reopen it at `path`


@contextlib.contextmanager
def enabled(setting: str) -> Iterator[str | None]:
    """Within the block, jax's persistent cache is `resolve(setting)` (or off); the process's
    previous setting is restored after it. Yields the directory."""
    path = resolve(setting)
    if path is not None:
        storage.path(path).mkdir(parents=True, exist_ok=True)
    previous = jax.config.jax_compilation_cache_dir
    log.info("compilation cache: %s", path or "off")
    _use(path)
    try:
        yield path
    finally:
        _use(previous)
