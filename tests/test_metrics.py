"""Peak FLOP/s for MFU: the right chip variant, and the float32 peak for float32 compute."""
import types

import pytest

from lmjax import metrics


def _device(kind, platform):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize("kind, dtype, peak, says", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12, "16-bit"),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12, "16-bit"),
    ("NVIDIA H100 NVL", "bfloat16", 835e12, "16-bit"),
    ("NVIDIA H100 PCIe", "float32", 378e12, "TF32"),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12, "TF32"),
    ("NVIDIA A100-PCIE-40GB", "bfloat16", 312e12, "16-bit"),
])
def test_gpu_peaks_by_variant_and_dtype(kind, dtype, peak, says):
    got, source = metrics.peak_flops(_device(kind, "gpu"), dtype)
    assert got == peak and kind in source and says in source


def test_unknown_h100_variant_has_no_peak_and_tpu_float32_is_the_bf16_rate():
    got, source = metrics.peak_flops(_device("NVIDIA H100", "gpu"))
    assert got != got  # NaN: no guess from another variant
    assert "unknown device kind" in source
    assert metrics.peak_flops(_device("TPU v5p", "tpu"), "float32") == (
        459e12, "table (TPU v5p, float32 matmuls as bf16 passes at default precision)")
