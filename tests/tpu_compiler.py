"""Whether this machine can run the TPU ahead-of-time compile tests.

libtpu is part of the test extra wherever PyPI has a wheel for it (x86_64 Linux), so there a
missing libtpu is a broken install and the tests fail; elsewhere they skip, saying why.
"""

import platform

import pytest

from lmjax.config import ConfigError
from lmjax.tools import aot


def require():
    try:
        aot.require_libtpu()
    except ConfigError as e:
        if platform.machine() == "x86_64":
            raise  # `pip install -e '.[test]'` installs libtpu here: the install is broken
        pytest.skip(f"libtpu has no wheel for {platform.machine()}; TPU compiles need it: {e}")
