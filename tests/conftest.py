"""Test-wide JAX set-up: 8 CPU devices, float32 numerics at full matmul precision.

These variables must be set before jax is imported anywhere in the test process.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402

from tests.helpers import hamlet_tokenizer  # noqa: E402  (imports jax: after the set-up)


@pytest.fixture(scope="session")
def tokenizer():
    """The Hamlet tokenizer with BOS (id 2), trained once per session: 300 pieces, so that
    models reading its ids need vocab_size >= 300."""
    tok = hamlet_tokenizer(bos_id=2)
    assert tok.vocab_size == 300
    return tok
