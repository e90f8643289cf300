"""Errors the command line reports as one line (no traceback) because they are not bugs.

`lmjax.config.ConfigError` (and its subclasses): the user's configuration or command is wrong;
exit code 2. `FaultError`: the environment failed (storage kept failing after retries, a peer
process died); the run stopped cleanly and left every checkpoint in place; exit code 1.
"""

from __future__ import annotations


class FaultError(RuntimeError):
    """An environment fault the run stopped on cleanly; the message says what to do next."""
