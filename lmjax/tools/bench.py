"""Times the parts of a run on this machine; `lmjax bench` prints the tables.

The train step on a fixed synthetic batch: several configurations (a sweep) are compiled in
one process and then timed in interleaved rounds, one step of each per round, so that their
ratios are measured under the same machine load. The data pipeline alone. Generation:
prefill and decode with random weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from lmjax.config import Config, ModelConfig
from lmjax.config_checks import validate
from lmjax.config_overrides import apply_overrides, parse_sweep
from lmjax.data.pipeline import synthetic_batch
from lmjax.inference import generate
from lmjax.model import transformer
from lmjax.observe import throughput
from lmjax.parallel import host_rows, sharding
from lmjax.train import compile_cache, trainer as trainer_lib


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
    trainer = trainer_lib.make_trainer(config, mesh)
    state = trainer.init_fn()
    batch = host_rows.global_batch(
        synthetic_batch(
            0, 0, 0, range(config.data.batch_size), config.data.seq_len, config.model.vocab_size
        ),
        trainer.batch_sharding,
    )
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
    rates = throughput.Throughput(
        config.model, config.data.batch_size, config.data.seq_len, jax.devices()
    )(step_s)
    return {
        "compile_s": case.compile_s,
        "step_s": step_s,
        "best_s": min(case.wall),
        "cpu_s": statistics.median(case.cpu),
        **rates,
        "loss": case.loss,
    }


def bench_step(config: Config, steps: int = 5) -> dict[str, float]:
    """Times one configuration: see `_summary` for the keys."""
    case = _prepare("", config)
    for _ in range(steps):
        _time_one(case)
    return _summary(case)


def sweep_overrides(sweeps: list[str]) -> list[list[str]]:
    """["a=1,2", "b=x,y"] -> [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]."""
    axes = [[f"{key}={v}" for v in values] for key, values in map(parse_sweep, sweeps)]
    return [list(c) for c in itertools.product(*axes)] if axes else [[]]


def time_sweep(
    config: Config, sweeps: list[str], steps: int, profile_dir: str = ""
) -> list[tuple[str, Config, dict[str, float]]]:
    """(name, config, `_summary`) of every configuration of the sweep (`sweep_overrides`),
    compiled first, then timed in `steps` interleaved rounds. `profile_dir`: also writes a
    jax.profiler trace of the timed rounds to PROFILE_DIR/plugins/profile/ (TensorBoard's
    profile plugin reads PROFILE_DIR)."""
    cases = []
    with compile_cache.enabled(config.run.compile_cache_dir):
        for overrides in sweep_overrides(sweeps):
            cfg = validate(apply_overrides(config, overrides))
            name = " ".join(overrides) or f"dtype={cfg.model.dtype} remat={cfg.model.remat}"
            cases.append(_prepare(name, cfg))
    with jax.profiler.trace(profile_dir) if profile_dir else contextlib.nullcontext():
        for _ in range(steps):
            for case in cases:
                _time_one(case)
    return [(case.name, case.config, _summary(case)) for case in cases]


def time_pipeline(
    make: Callable[[], Any], start_step: int = 0, seconds: float = 10.0
) -> dict[str, float]:
    """Reads training batches from `make()` (a data.Pipeline) for `seconds` after one warm-up
    batch at `start_step`: setup_s (make and the first batch), batches, seconds,
    tokens_per_second."""
    start = time.perf_counter()
    batches = make().train_batches(start_step)
    tokens_per_batch = next(batches)["inputs"].size
    begin = time.perf_counter()
    count = 0
    while time.perf_counter() - begin < seconds:
        next(batches)
        count += 1
    elapsed = time.perf_counter() - begin
    batches.close()
    return {
        "setup_s": begin - start,
        "batches": count,
        "seconds": elapsed,
        "tokens_per_second": count * tokens_per_batch / elapsed,
    }


def time_generation(
    model_cfg: ModelConfig,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    *,
    seed: int = 0,
    window_cache: bool = True,
) -> dict[str, float]:
    """Prefill and decode of random prompts with random weights, each compiled before it is
    timed: seconds and tokens/s of each phase (decode counts every token: nothing stops
    early), and the KV cache's bytes (`window_cache=False`: local layers keep max_len slots,
    for comparison)."""
    tokens, lengths = generate.check_prompts(
        model_cfg,
        np.random.default_rng(seed).integers(0, model_cfg.vocab_size, (batch, prompt_len)),
        None,
        new_tokens,
    )
    params = jax.jit(transformer.init, static_argnums=0)(model_cfg, jax.random.PRNGKey(seed))
    max_len = prompt_len + new_tokens
    timed = functools.partial(
        _prefill_and_decode,
        params,
        tokens,
        lengths,
        model_cfg,
        max_len,
        new_tokens,
        seed,
        window_cache,
    )
    timed()  # compile
    prefill_s, decode_s = timed()
    cache = jax.eval_shape(
        functools.partial(generate.init_cache, model_cfg, batch, max_len, window_cache=window_cache)
    )
    return {
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_tokens_per_s": batch * new_tokens / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "cache_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)),
    }


def _prefill_and_decode(
    params,
    tokens,
    lengths,
    model_cfg: ModelConfig,
    max_len: int,
    new_tokens: int,
    seed: int,
    window_cache: bool,
) -> tuple[float, float]:
    """Seconds of one prefill and of one greedy decode of `new_tokens` (each run to the end)."""
    sampling = generate.Sampling()
    t0 = time.perf_counter()
    logits, cache = jax.block_until_ready(
        generate.prefill_jit(
            params,
            tokens,
            lengths,
            cfg=model_cfg,
            max_len=max_len,
            context=None,
            window_cache=window_cache,
        )
    )
    t1 = time.perf_counter()
    jax.block_until_ready(
        generate.decode_jit(
            params,
            logits,
            cache,
            lengths,
            np.int32(seed),
            cfg=model_cfg,
            sampling=sampling,
            eos_id=None,
            max_new_tokens=new_tokens,
            context=None,
        )
    )
    return t1 - t0, time.perf_counter() - t1
