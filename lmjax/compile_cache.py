"""JAX's persistent compilation cache, so a restarted run (or a second benchmark) loads its
compiled steps instead of compiling them again.

`run.compile_cache_dir`: "auto" (the default) uses $JAX_COMPILATION_CACHE_DIR when set,
else $XDG_CACHE_HOME/lmjax/jax-compile (~/.cache/... without it); "" turns the cache off;
anything else is the directory, local or gs:// (on a pod, a bucket every host can read).
jax caches only computations that took longer than
`jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile.
"""
from __future__ import annotations

import logging
import os

import jax
from jax.experimental.compilation_cache import compilation_cache

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


def enable(setting: str) -> str | None:
    """Points jax's persistent cache at `resolve(setting)` (or turns it off) for the
    compilations that follow in this process; returns the directory."""
    path = resolve(setting)
    if path is not None and "://" not in path:
        os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()  # jax opens the cache once; reopen it at `path`
    log.info("compilation cache: %s", path or "off")
    return path
