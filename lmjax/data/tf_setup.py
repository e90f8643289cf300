"""Lazy TensorFlow import that hides every accelerator from TensorFlow.

The data pipeline uses TensorFlow only on the host CPU; JAX owns the GPUs and TPUs. Importing
through `tensorflow()` keeps `import lmjax` light and makes sure TensorFlow never reserves
accelerator memory.
"""

from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=None)
def tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):
            # RuntimeError: devices were already initialised by an earlier TF user in this
            # process; ValueError: this TensorFlow build has no such device type.
            pass
    return tf
