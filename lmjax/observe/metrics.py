"""FLOPs accounting, MFU, metric writers (JSONL, TensorBoard, terminal progress), and the one
reader of a run's metrics.jsonl."""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lmjax.config import ModelConfig
from lmjax.hardware import DEVICE_KINDS, GENERATIONS
from lmjax.model import transformer

# Dense peak FLOP/s per chip by the start of `device.device_kind` (the longest matching
# prefix wins): (16-bit matmuls, float32 matmuls). TPUs run float32 matmuls at default
# precision as bfloat16 MXU passes, so both numbers are the bf16 peak; NVIDIA GPUs run them
# as TF32 on tensor cores (XLA's default), so the second number is the TF32 peak. H100 kinds
# are named in full: the PCIe and NVL cards are slower than SXM, and an unknown H100 variant
# reports no peak rather than a wrong one. TPU peaks come from `hardware.GENERATIONS` (by
# `hardware.DEVICE_KINDS`); GPU peaks are from NVIDIA's data sheets.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    **{kind: (GENERATIONS[g].peak_flops,) * 2 for kind, g in DEVICE_KINDS.items()},
    "NVIDIA A100": (312e12, 156e12),  # SXM and PCIe alike
    "NVIDIA L4": (121e12, 60e12),
    "NVIDIA H100 80GB HBM3": (989e12, 495e12),  # SXM5
    "NVIDIA H100 SXM": (989e12, 495e12),
    "NVIDIA H100 PCIe": (756e12, 378e12),
    "NVIDIA H100 NVL": (835e12, 418e12),
    "NVIDIA H200": (989e12, 495e12),
}

# A run's log, in its workdir: one JSON object a line, appended by every start of the run.
METRICS_FILE = "metrics.jsonl"


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params, plus causal attention counted once per
    (query, key) pair: 3 passes x 2 matmuls x 2 flops x heads x head_dim x seq/2 per layer."""
    n_matmul = transformer.count_params(cfg, include_embed=False)
    if cfg.tie_embeddings:  # the tied embedding still costs a vocab projection
        n_matmul += cfg.vocab_size * cfg.d_model
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6.0 * n_matmul + attention


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


class MetricsWriter:
    """Writes one JSON object per line to `metrics.jsonl`, scalars to TensorBoard, each record
    to the `outputs` (objects with write(step, record) and close(), e.g. W&B), and a progress
    line to stdout. Only process 0 writes; the others are silent no-ops."""

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        *,
        enabled: bool = True,
        start_step: int = 0,
        outputs: tuple = (),
    ):
        """start_step: the step this process starts at (a resumed run's restored step); the
        ETA divides this process's time by the steps it has done since."""
        self.enabled = enabled
        self.outputs = outputs
        self.total_steps = total_steps
        self.start_step = start_step
        self.start = time.time()
        self.tty = sys.stdout.isatty()
        self._jsonl = self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, METRICS_FILE)
            drop_torn_tail(path)
            self._jsonl = open(path, "a")
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: dict[str, Any], *, progress: bool = True) -> None:
        """Appends `{"step": step, **values}`; `progress=False` keeps it off the terminal."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        self._tb.flush()
        for out in self.outputs:
            out.write(step, record)
        if progress:
            self._progress(step, record)

    def _progress(self, step: int, record: dict) -> None:
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "step")
        done = max(step - self.start_step, 1)
        eta = (time.time() - self.start) / done * (self.total_steps - step)
        line = f"step {step}/{self.total_steps} {shown} eta={eta:.0f}s"
        if self.tty:
            print("\r" + line[: os.get_terminal_size().columns - 1], end="", flush=True)
            if "eval_loss" in record or step >= self.total_steps:
                print()
        else:
            print(line, flush=True)

    def close(self, final: Callable[[], tuple[int, dict[str, Any]]] | None = None) -> None:
        """Closes TensorBoard and the outputs, then appends `final()` -> (step, values) to
        metrics.jsonl alone: computed last, a record can account for the closing itself."""
        if not self.enabled:
            return
        self._tb.close()
        for out in self.outputs:
            out.close()
        if final is not None:
            step, values = final()
            self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.close()


def drop_torn_tail(path: str) -> None:
    """Cuts a last line without its newline from the file at `path`, if any: the record a
    killed process was writing, never readable. Appending after it would glue the next record
    onto it and leave an unreadable line in the middle of the file."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        end = pos = f.seek(0, os.SEEK_END)
        while pos > 0:  # back from the end, a block at a time, to the last newline
            start = max(pos - 4096, 0)
            f.seek(start)
            block = f.read(pos - start)
            if pos == end and block.endswith(b"\n"):
                return
            newline = block.rfind(b"\n")
            if newline >= 0:
                f.truncate(start + newline + 1)
                return
            pos = start
        f.truncate(0)


def read_records(workdir: str | os.PathLike, *, missing_ok: bool = False) -> list[dict]:
    """The records of `workdir`/metrics.jsonl in file order, every start of the run included.

    A last line without its newline is left out: a process killed while writing it (or one
    still writing) leaves it torn, and every complete record ends with a newline. A missing
    file raises FileNotFoundError, or with `missing_ok` reads as no records (a run that has
    not logged yet).
    """
    try:
        with open(os.path.join(workdir, METRICS_FILE)) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        if missing_ok:
            return []
        raise


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
