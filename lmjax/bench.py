"""`lmjax bench`: times the real train step on a fixed synthetic batch and prints a table.

Several configurations (`--sweep key=v1,v2`) are compiled in one process and then timed in
interleaved rounds, so their ratios are measured under the same machine load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import statistics
import time
from typing import Any

import jax
import numpy as np

from lmjax import compile_cache, metrics, sharding, train
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


@dataclasses.dataclass
class _Case:
    name: str
    config: Config
    compiled: Any
    state: Any
    batch: Any
    compile_s: float
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    loss: float = float("nan")


def _prepare(name: str, config: Config) -> _Case:
    """Builds the trainer, compiles the step and runs one warm-up step."""
    mesh = sharding.make_mesh(config.mesh)
    trainer = train.make_trainer(config, mesh)
    state = trainer.init_fn()
    batch = train.global_batch(
        synthetic_batch(config.data.batch_size, config.data.seq_len, config.model.vocab_size),
        trainer.batch_sharding)
    start = time.perf_counter()
    compiled = trainer.step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    return _Case(name, config, compiled, state, batch, compile_s)


def _time_one(case: _Case) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    case.state, m = case.compiled(case.state, case.batch)
    jax.block_until_ready(m)
    case.wall.append(time.perf_counter() - wall)
    case.cpu.append(time.process_time() - cpu)
    case.loss = float(m["loss"])


def _summary(case: _Case) -> dict[str, float]:
    """Compile seconds, median step seconds (wall and process CPU), tokens/s, TFLOP/s per
    device, MFU."""
    config = case.config
    step_s = statistics.median(case.wall)
    rates = metrics.Throughput(config.model, config.data.batch_size, config.data.seq_len,
                               jax.devices())(step_s)
    return {"compile_s": case.compile_s, "step_s": step_s, "best_s": min(case.wall),
            "cpu_s": statistics.median(case.cpu), **rates, "loss": case.loss}


def bench_step(config: Config, steps: int = 5) -> dict[str, float]:
    """Times one configuration: see `_summary` for the keys."""
    case = _prepare("", config)
    for _ in range(steps):
        _time_one(case)
    return _summary(case)


def sweep_overrides(sweeps: list[str]) -> list[list[str]]:
    """["a=1,2", "b=x,y"] -> [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]."""
    axes = []
    for s in sweeps:
        key, _, values = s.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def main(config: Config, sweeps: list[str], steps: int, profile_dir: str = "") -> list[dict]:
    """Compiles every configuration of the sweep, then times them in interleaved rounds
    (one step of each per round), so that a change of machine load hits all of them alike.
    `profile_dir`: also writes a jax.profiler trace of the timed rounds to
    PROFILE_DIR/plugins/profile/ (TensorBoard's profile plugin reads PROFILE_DIR)."""
    device = jax.devices()[0]
    m, d = config.model, config.data
    print(f"device: {device.device_kind} x {jax.device_count()}")
    print(f"model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads x "
          f"{m.head_dim}, mlp {m.d_mlp}, vocab {m.vocab_size}; batch {d.batch_size} x seq {d.seq_len}")
    cases = []
    with compile_cache.enabled(config.run.compile_cache_dir):
        for overrides in sweep_overrides(sweeps):
            cfg = validate(apply_overrides(config, overrides))
            name = " ".join(overrides) or f"dtype={m.dtype} remat={m.remat}"
            cases.append(_prepare(name, cfg))
    with jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext():
        for _ in range(steps):
            for case in cases:
                _time_one(case)
    for dtype in sorted({c.config.model.dtype for c in cases}):
        peak, source = metrics.peak_flops(device, dtype)
        print(f"MFU peak for {dtype}: {peak / 1e12:.3f} TFLOP/s ({source})")
    width = max(44, *(len(c.name) for c in cases))
    header = (f"{'config':<{width}} {'compile s':>9} {'step s':>8} {'best s':>7} {'cpu s':>7} "
              f"{'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6}")
    print(header)
    rows = []
    for case in cases:
        r = _summary(case)
        rows.append({"config": case.name, **r})
        print(f"{case.name:<{width}} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['best_s']:>7.3f} "
              f"{r['cpu_s']:>7.2f} {r['tokens_per_second']:>9.0f} "
              f"{r['tflops_per_device']:>8.3f} {r['mfu']:>6.1%}", flush=True)
    print("step s: median wall seconds; best s: fastest step; cpu s: process CPU seconds per step "
          "(all threads), a load-robust measure of work on a shared machine.")
    return rows
