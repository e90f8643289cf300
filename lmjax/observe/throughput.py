"""How fast a step runs against what the chip can do: tokens/s, TFLOP/s per device and MFU
(`Throughput`, the one home of this arithmetic: training logs it, `lmjax bench` prints it),
the chip's peak (from the hardware table, or measured on a CPU), and host and device memory."""

from __future__ import annotations

import functools
import os
import resource
import time

import jax
import jax.numpy as jnp

from lmjax.config import ModelConfig
from lmjax.hardware import PEAK_FLOPS
from lmjax.model.flops import flops_per_token


def _best_seconds(fn, x, repeats: int = 5, *, chain: bool = False) -> float:
    """The fastest of `repeats` timed calls of the jitted `fn(x)`, after one warm-up call;
    with `chain`, each call takes the previous result (so a donating `fn` reuses its buffer)."""
    y = fn(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        y = fn(y if chain else x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def _measured_cpu_peak(dtype: str) -> float:
    n = 1024
    return 2 * n**3 / _best_seconds(jax.jit(lambda x: x @ x), jnp.ones((n, n), dtype))


@functools.cache
def measured_cpu_bandwidth(n_bytes: int = 256 * 1024**2) -> float:
    """Memory bytes per second of this CPU: a jitted `x + 1` over `n_bytes` of float32 reads
    and writes each element once, in place (a donated buffer: no fresh pages to fault in)."""
    add = jax.jit(lambda a: a + 1, donate_argnums=0)
    return 2 * n_bytes / _best_seconds(add, jnp.zeros(n_bytes // 4), chain=True)


def peak_flops(device: jax.Device, compute_dtype: str = "bfloat16") -> tuple[float, str]:
    """(peak FLOP/s of one device for matmuls in `compute_dtype`, where the number comes from)."""
    kind = device.device_kind
    float32 = jnp.dtype(compute_dtype) == jnp.float32
    for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(prefix):
            peak = PEAK_FLOPS[prefix][1 if float32 else 0]
            if not float32:
                return peak, f"table ({kind}, 16-bit)"
            unit = "TF32" if device.platform == "gpu" else "bf16 passes at default precision"
            return peak, f"table ({kind}, float32 matmuls as {unit})"
    if device.platform == "cpu":
        return _measured_cpu_peak(compute_dtype), f"measured {compute_dtype} matmul on this CPU"
    return float("nan"), f"unknown device kind {kind!r}: no peak, so no MFU"


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU of a step of `seconds` (the one home of this
    arithmetic: training logs it, `lmjax bench` prints it)."""

    def __init__(
        self, model_cfg: ModelConfig, batch_size: int, seq_len: int, devices: list[jax.Device]
    ):
        self.tokens = batch_size * seq_len
        self.flops = flops_per_token(model_cfg, seq_len) * self.tokens
        self.peak, self.peak_source = peak_flops(devices[0], model_cfg.dtype)
        self.n_devices = len(devices)

    def __call__(self, seconds: float) -> dict[str, float]:
        per_device = self.flops / seconds / self.n_devices
        return {
            "tokens_per_second": self.tokens / seconds,
            "tflops_per_device": per_device / 1e12,
            "mfu": per_device / self.peak,
        }


def memory_usage() -> dict[str, float]:
    """GiB: device memory in use and its peak on the first local device (when the backend
    reports it; the CPU backend does not), and this process's resident host memory."""
    out = {}
    stats = jax.local_devices()[0].memory_stats() or {}
    for key, name in (
        ("bytes_in_use", "device_memory_gib"),
        ("peak_bytes_in_use", "device_memory_peak_gib"),
    ):
        if key in stats:
            out[name] = stats[key] / 2**30
    out["host_rss_gib"] = _host_rss_bytes() / 2**30
    return out


def _host_rss_bytes() -> int:
    try:  # Linux: the current resident set; elsewhere the peak is the best available
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
