"""The checks of `lmjax smoke`: is this machine ready to train? A few real steps, end to end.

Runs on whatever devices are present (one GPU, TPU or the CPU; the mesh is the experiment's):
checks that the train step and the prefill run the fused attention kernel the platform
selects (a GPU or TPU smoke test must not pass on the XLA fallback; `fused_kernel`), trains a few steps of the
experiment (the default, `smoke`, reads the packaged corpus), checks the loss falls, resumes
from a mid-run checkpoint in a second run and checks that it continues bit for bit, checks
that `lmjax eval` on the last checkpoint reproduces the eval loss training logged, generates
a few tokens, and reports. Each check that fails says what to look at.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time

import jax

from lmjax.checkpoint import paths
from lmjax.config import Config
from lmjax.config_overrides import apply_overrides
from lmjax.inference import evaluate, generate, saved_run
from lmjax.observe import metrics
from lmjax.tools import checklist, doctor, fused_kernel
from lmjax.tools.checklist import Check, guard
from lmjax.train import run

# (config, tokenizer or None, workdir) -> the run's evaluation batches, as `lmjax eval
# --experiment-data` builds them; the caller passes it so that this module stays below the
# command layer.


def _losses(workdir: str) -> dict[int, float]:
    """{step: loss} of the run in `workdir` (a replayed step: its last loss)."""
    return {r["step"]: r["loss"] for r in metrics.read_records(workdir) if "loss" in r}


def _memory() -> str:
    """Peak device memory when the backend reports it (the CPU's does not), else peak RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        limit = stats.get("bytes_limit", 0)
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB peak of {limit / 2**30:.1f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return f"{rss:.2f} GiB peak process RSS (host memory)"


def _trains(config: Config, workdir: str) -> Check:
    """Trains `config` in `workdir`; passes when the last logged loss is below the first."""
    run.train(config, workdir)
    losses = _losses(workdir)
    start, end = losses[min(losses)], losses[max(losses)]
    return Check(
        "loss falls", end < start, f"step 1 loss {start:.3f} -> step {max(losses)} {end:.3f}"
    )


def _resumes(config: Config, first: str, second: str, half: int) -> Check:
    """Trains again in `second` from `first`'s checkpoint of step `half`; passes when every
    later loss equals `first`'s bit for bit."""
    run.train(config, second, restore_from=os.path.join(paths.checkpoint_dir(first), str(half)))
    a, b = _losses(first), _losses(second)
    after = [s for s in a if s > half]
    same = bool(after) and all(a[s] == b.get(s) for s in after)
    return Check(
        "resume is exact",
        same,
        f"steps {half + 1}-{max(a)} after restoring step {half}: "
        + ("bitwise equal" if same else f"differ: {[(s, a[s], b.get(s)) for s in after]}"),
    )


def _evaluates(workdir: str) -> Check:
    """`lmjax eval --experiment-data` on the last checkpoint gives the run's final eval loss."""
    logged = [r["eval_loss"] for r in metrics.read_records(workdir) if "eval_loss" in r][-1]
    cfg, params, tokenizer = saved_run.load(workdir, None)
    with saved_run.context(cfg):
        batches = saved_run.eval_batches(cfg, tokenizer, workdir)
        loss = evaluate.eval_loss(params, cfg.model, batches)
    ok = math.isclose(loss["loss"], logged, rel_tol=1e-4)
    return Check(
        "evaluates",
        ok,
        f"eval loss {loss['loss']:.4f} from the checkpoint, {logged:.4f} logged by training",
    )


def _generates(workdir: str) -> Check:
    """Samples 16 tokens from the last checkpoint; passes when the prompt grew."""
    cfg, params, tokenizer = saved_run.load(workdir, None)
    start = time.perf_counter()
    with saved_run.context(cfg):
        text = generate.sample_text(params, cfg.model, tokenizer, cfg.run.sample_prompt, 16)
    return Check(
        "generates",
        len(text) > len(cfg.run.sample_prompt),
        f"{text!r} ({time.perf_counter() - start:.1f} s with compile)",
    )


def run_checks(config: Config, steps: int, workdir: str, expect_platform: str = "") -> list[Check]:
    """Runs every check in `workdir` and returns them. `expect_platform` ("gpu", "tpu")
    fails the device check when jax came up on another platform (e.g. fell back to CPU)."""
    half = max(steps // 2, 1)
    config = apply_overrides(
        config,
        [
            f"run.steps={steps}",
            "run.log_every=1",
            "run.eval_every=0",
            f"checkpoint.every_steps={half}",
            "run.sample_tokens=0",
        ],
    )
    first, second = os.path.join(workdir, "run"), os.path.join(workdir, "resumed")
    return [
        guard("devices", doctor.PLATFORM_HINT, lambda: doctor.devices(expect_platform)),
        guard(
            "attention kernel",
            "set model.attention=xla to run without a fused kernel",
            lambda: fused_kernel.verdict(
                fused_kernel.train_step_program(config), config, jax.default_backend()
            ),
        ),
        guard(
            "prefill kernel",
            "set model.attention=xla to run without a fused kernel",
            lambda: fused_kernel.verdict(
                fused_kernel.prefill_program(config), config, jax.default_backend(), "prefill"
            ),
        ),
        guard("loss falls", "check the data path and optim.lr", lambda: _trains(config, first)),
        guard(
            "resume is exact",
            "look at checkpoint saving (orbax) and the data position",
            lambda: _resumes(config, first, second, half),
        ),
        guard(
            "evaluates",
            "look at lmjax.inference.evaluate and the saved params",
            lambda: _evaluates(first),
        ),
        guard(
            "generates",
            "look at lmjax.inference.generate and the saved params",
            lambda: _generates(first),
        ),
    ]


def report(checks: list[Check], workdir: str) -> str:
    """The report: a PASS/FAIL line a check, the first run's median step time, tokens/s and
    MFU after its compiling first step, device memory, and the verdict."""
    lines = ["lmjax smoke report"]
    lines += checklist.lines(checks)
    records = [
        r
        for r in metrics.read_records(os.path.join(workdir, "run"), missing_ok=True)
        if "step_seconds" in r
    ]
    if len(records) > 1:
        steady = records[1:]  # the first step includes compilation
        lines.append(
            f"  step time {statistics.median(r['step_seconds'] for r in steady):.3f} s, "
            f"{statistics.median(r['tokens_per_second'] for r in steady):.0f} tokens/s, "
            f"MFU {statistics.median(r['mfu'] for r in steady):.1%}"
        )
    lines.append(f"  memory: {_memory()}")
    lines.append(
        "all checks passed"
        if all(c.ok for c in checks)
        else f"{sum(not c.ok for c in checks)} check(s) FAILED"
    )
    return "\n".join(lines)
