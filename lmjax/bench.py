"""`lmjax bench`: times the real train step on a fixed synthetic batch and prints a table.

Several configurations (`--sweep key=v1,v2`) run in one process, one after the other, so
their ratios are measured under the same machine load.
"""
from __future__ import annotations

import itertools
import statistics
import time

import jax
import numpy as np

from lmjax import metrics, sharding, train
from lmjax.config import Config, apply_overrides, validate


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One packed-looking batch of random tokens: [batch, seq] arrays, two documents per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1), dtype=np.int32)
    half = seq_len // 2
    segment_ids = np.where(np.arange(seq_len) < half, 1, 2).astype(np.int32)
    positions = np.where(np.arange(seq_len) < half, np.arange(seq_len), np.arange(seq_len) - half)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.broadcast_to(segment_ids, (batch_size, seq_len)).copy(),
            "positions": np.broadcast_to(positions.astype(np.int32), (batch_size, seq_len)).copy(),
            "loss_mask": np.ones((batch_size, seq_len), np.float32)}


def bench_step(config: Config, steps: int = 5) -> dict[str, float]:
    """Compile seconds, median step seconds, tokens/s, achieved TFLOP/s and MFU."""
    mesh = sharding.make_mesh(config.mesh)
    trainer = train.make_trainer(config, mesh)
    state = trainer.init_fn()
    batch = train.global_batch(
        synthetic_batch(config.data.batch_size, config.data.seq_len, config.model.vocab_size),
        trainer.batch_sharding)
    start = time.perf_counter()
    compiled = trainer.step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, m = compiled(state, batch)  # warm-up step
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = config.data.batch_size * config.data.seq_len
    flops = metrics.flops_per_token(config.model, config.data.seq_len) * tokens
    peak, _ = metrics.peak_flops(jax.devices()[0], config.model.dtype)
    return {"compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "tflops": flops / step_s / 1e12 / jax.device_count(),
            "mfu": flops / step_s / (peak * jax.device_count()), "loss": float(m["loss"])}


def sweep_overrides(sweeps: list[str]) -> list[list[str]]:
    """["a=1,2", "b=x,y"] -> [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]."""
    axes = []
    for s in sweeps:
        key, _, values = s.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def main(config: Config, sweeps: list[str], steps: int) -> list[dict]:
    rows = []
    device = jax.devices()[0]
    _, peak_source = metrics.peak_flops(device, config.model.dtype)
    print(f"device: {device.device_kind} x {jax.device_count()}; MFU peak: {peak_source}")
    m, d = config.model, config.data
    print(f"model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads x "
          f"{m.head_dim}, mlp {m.d_mlp}, vocab {m.vocab_size}; batch {d.batch_size} x seq {d.seq_len}")
    header = f"{'config':<40} {'compile s':>9} {'step s':>8} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6}"
    print(header)
    for overrides in sweep_overrides(sweeps):
        cfg = validate(apply_overrides(config, overrides))
        r = bench_step(cfg, steps)
        name = " ".join(overrides) or f"dtype={m.dtype} remat={m.remat}"
        rows.append({"config": name, **r})
        print(f"{name:<40} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['tflops']:>8.3f} {r['mfu']:>6.1%}", flush=True)
    return rows
