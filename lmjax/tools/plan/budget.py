"""Sizes from a plan's best step: a run of N tokens or D days, and the compute-optimal model
and token count for a chip-hour budget (Chinchilla)."""

from __future__ import annotations

import math
from typing import Any

from lmjax.config import ConfigError
from lmjax.model import transformer

# Chinchilla (Hoffmann et al. 2022): compute-optimal training uses about 20 tokens per
# parameter, with training compute C = 6 N D.
CHINCHILLA_TOKENS_PER_PARAM = 20


def run_length(
    step_s: float, tokens_per_step: int, chips: int, *, tokens: float = 0, days: float = 0
) -> dict:
    """Steps, wall time and chip-hours to train on `tokens` (or for `days`) at `step_s`."""
    if tokens <= 0 and days <= 0:
        raise ConfigError("give --tokens N or --days D (positive)")
    steps = math.ceil(tokens / tokens_per_step) if tokens > 0 else math.floor(days * 86400 / step_s)
    seconds = steps * step_s
    return {
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "wall_seconds": seconds,
        "days": seconds / 86400,
        "chip_hours": seconds / 3600 * chips,
    }


def compute_optimal(chip_hours: float, peak_flops: float, mfu: float) -> tuple[float, float]:
    """(parameters N, tokens D) that spend `chip_hours` at `mfu` of `peak_flops` per chip with
    C = 6 N D and D = CHINCHILLA_TOKENS_PER_PARAM x N."""
    budget = chip_hours * 3600 * peak_flops * mfu
    n = math.sqrt(budget / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return n, CHINCHILLA_TOKENS_PER_PARAM * n


def derived_shape(n_params: float, vocab_size: int) -> dict[str, int]:
    """A Llama shape of about `n_params` parameters: 128-wide heads, 4 query heads per KV
    head, MLP 3.5 x d_model (multiple of 256), depth d_model / 128 (per layer 13 x
    d_model^2 parameters with those ratios, plus 2 x vocab x d_model of embeddings)."""
    best: tuple[int, dict[str, int]] | None = None
    for d_model in range(256, 32769, 256):
        layers = max(2, d_model // 128)
        d_mlp = 256 * round(3.5 * d_model / 256)
        heads = max(1, d_model // 128)
        kv = max(1, heads // 4)
        n = (
            layers * (d_model * 128 * (2 * heads + 2 * kv) + 3 * d_model * d_mlp)
            + 2 * vocab_size * d_model
        )
        if best is None or abs(math.log(n / n_params)) < abs(math.log(best[0] / n_params)):
            best = (
                n,
                {
                    "model.d_model": d_model,
                    "model.n_layers": layers,
                    "model.n_heads": heads,
                    "model.n_kv_heads": kv,
                    "model.head_dim": 128,
                    "model.d_mlp": d_mlp,
                },
            )
    assert best is not None  # the loop runs at least once
    return best[1]


def budget_proposal(
    chip_hours: float, peak_flops: float, mfu: float, presets: dict[str, Any], vocab_size: int
) -> dict:
    """The compute-optimal N and D for the budget, the preset closest in N (with the tokens
    the budget buys it) and a derived shape. presets: {name: ModelConfig}."""
    n, d = compute_optimal(chip_hours, peak_flops, mfu)
    sizes = {name: transformer.count_params(cfg) for name, cfg in presets.items()}
    nearest = min(sizes, key=lambda k: abs(math.log(sizes[k] / n))) if sizes else None
    budget = chip_hours * 3600 * peak_flops * mfu
    return {
        "chip_hours": chip_hours,
        "mfu_assumed": mfu,
        "flops": budget,
        "optimal_params": n,
        "optimal_tokens": d,
        "tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM,
        "preset": nearest,
        "preset_params": sizes[nearest] if nearest else None,
        "preset_tokens": budget / (6 * sizes[nearest]) if nearest else None,
        "derived_shape": derived_shape(n, vocab_size),
    }


def format_budget(b: dict) -> str:
    shape = " ".join(f"--set {k}={v}" for k, v in b["derived_shape"].items())
    head = (
        f"budget: {b['chip_hours']:,.0f} chip-hours at {100 * b['mfu_assumed']:.1f}% MFU "
        f"(the best candidate's estimate) = {b['flops']:.3g} FLOPs; compute-optimal with "
        f"C = 6 N D and D = {b['tokens_per_param']} N (Chinchilla): "
        f"N = {b['optimal_params']:.3g} parameters, D = {b['optimal_tokens']:.3g} tokens"
    )
    lines = [head]
    if b["preset"]:
        lines.append(
            f"  nearest preset: {b['preset']} ({b['preset_params']:.3g} parameters), "
            f"{b['preset_tokens']:.3g} tokens for the budget"
        )
    lines.append(f"  derived shape: {shape}")
    return "\n".join(lines)
