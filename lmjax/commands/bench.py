"""`lmjax bench step|data|generate`: each prints a table of one part's speed on this machine."""

from __future__ import annotations

import argparse

from lmjax.commands import experiment
from lmjax.config import Config, ModelConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="print a benchmark table: the train step (default), the "
        "data pipeline alone, or generation",
    )
    p.add_argument("what", nargs="?", choices=["step", "data", "generate"], default="step")
    experiment.add_arguments(p, default="bench_512")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="step: run once per value and compare in one table (repeatable: a grid)",
    )
    p.add_argument("--steps", type=int, default=5, help="step: timed steps per configuration")
    p.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="step: write a jax.profiler trace of the timed steps to "
        "DIR/plugins/profile/ (open DIR in TensorBoard)",
    )
    p.add_argument(
        "--workdir",
        default="",
        help="data: run directory whose tokenizer and store "
        "to use (default ~/.cache/lmjax/RUN_NAME)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="data: how long to read")
    p.add_argument("--start-step", type=int, default=0, help="data: the first step read")
    p.add_argument("--batch", type=int, default=8, help="generate: prompts per batch")
    p.add_argument("--prompt-len", type=int, default=128, help="generate: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="generate: tokens to decode")
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    config = experiment.load_experiment(args.experiment, args.overrides)
    if args.what == "step":
        step(config, sweeps=args.sweep, steps=args.steps, profile_dir=args.profile)
    elif args.what == "data":
        data(config, experiment.data_workdir(args.workdir, config), args.seconds, args.start_step)
    else:
        generation(config.model, args.batch, args.prompt_len, args.new_tokens)
    return 0


def step(config: Config, sweeps: list[str], steps: int, profile_dir: str = "") -> list[dict]:
    """The train step of every configuration of the sweep (`bench.time_sweep`), one row each:
    compile and step seconds, tokens/s, TFLOP/s per device and MFU. Returns the rows."""
    import jax

    from lmjax.observe import throughput
    from lmjax.tools import bench

    device = jax.devices()[0]
    m, d = config.model, config.data
    print(f"device: {device.device_kind} x {jax.device_count()}")
    print(
        f"model: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads x "
        f"{m.head_dim}, mlp {m.d_mlp}, vocab {m.vocab_size}; batch {d.batch_size} x seq {d.seq_len}"
    )
    cases = bench.time_sweep(config, sweeps, steps, profile_dir)
    for dtype in sorted({cfg.model.dtype for _, cfg, _ in cases}):
        peak, source = throughput.peak_flops(device, dtype)
        print(f"MFU peak for {dtype}: {peak / 1e12:.3f} TFLOP/s ({source})")
    width = max(44, *(len(name) for name, _, _ in cases))
    print(
        f"{'config':<{width}} {'compile s':>9} {'step s':>8} {'best s':>7} {'cpu s':>7} "
        f"{'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6}"
    )
    rows = []
    for name, _, r in cases:
        rows.append({"config": name, **r})
        print(
            f"{name:<{width}} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['best_s']:>7.3f} "
            f"{r['cpu_s']:>7.2f} {r['tokens_per_second']:>9.0f} "
            f"{r['tflops_per_device']:>8.3f} {r['mfu']:>6.1%}",
            flush=True,
        )
    print(
        "step s: median wall seconds; best s: fastest step; cpu s: process CPU seconds per step "
        "(all threads), a load-robust measure of work on a shared machine."
    )
    return rows


def data(config: Config, workdir: str, seconds: float = 10.0, start_step: int = 0) -> float:
    """Prints and returns the tokens/s the pipeline alone delivers (`bench.time_pipeline`)."""
    from lmjax.inference import saved_run
    from lmjax.tools import bench

    r = bench.time_pipeline(lambda: saved_run.pipeline(config, workdir), start_step, seconds)
    d = config.data
    print(f"source={d.source} seq_len={d.seq_len} batch_size={d.batch_size} packing={d.packing}")
    print(f"set-up (tokenizer, store, first batch at step {start_step}): {r['setup_s']:.2f} s")
    print(f"{r['batches']} batches in {r['seconds']:.2f} s: {r['tokens_per_second']:,.0f} tokens/s")
    return r["tokens_per_second"]


def generation(
    model_cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, seed: int = 0
) -> dict[str, float]:
    """Prints a table of prefill and decode speed (`bench.time_generation`); returns it."""
    import jax

    from lmjax.model import transformer
    from lmjax.tools import bench

    r = bench.time_generation(model_cfg, batch, prompt_len, new_tokens, seed=seed)
    print(
        f"generate benchmark on {jax.devices()[0].device_kind}: "
        f"{transformer.count_params(model_cfg):,} params, {model_cfg.dtype}, batch {batch}, "
        f"prompt {prompt_len}, new {new_tokens}"
    )
    print(f"{'phase':<8}{'tokens':>10}{'seconds':>10}{'tokens/s':>12}")
    print(
        f"{'prefill':<8}{batch * prompt_len:>10}{r['prefill_s']:>10.4f}"
        f"{r['prefill_tokens_per_s']:>12.1f}"
    )
    print(
        f"{'decode':<8}{batch * new_tokens:>10}{r['decode_s']:>10.4f}"
        f"{r['decode_tokens_per_s']:>12.1f}"
    )
    print(
        f"KV cache: {r['cache_bytes']:,} bytes (k and v, [layers, batch, slots, kv_heads, "
        f"head_dim]; slots: max_len={prompt_len + new_tokens}, a local layer's its window)"
    )
    return r
