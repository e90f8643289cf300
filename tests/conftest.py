"""Test-wide JAX set-up: 8 CPU devices, float32 numerics at full matmul precision.

These variables must be set before jax is imported anywhere in the test process.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
