"""Names of pytree leaves: a jax key path as "a/b/0" (dict keys, attribute names and sequence
indices joined by "/"), the one spelling lmjax uses in messages, logs and checkpoint checks."""

from __future__ import annotations

from typing import Any


def path_name(path: tuple[Any, ...]) -> str:
    """A key path from `jax.tree_util.tree_flatten_with_path` as "layers/wq" or
    "opt_state/0/mu/embed"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
