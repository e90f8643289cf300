"""The optimizer: AdamW with global-norm clipping, a step-indexed schedule and a decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lmjax.config import OptimConfig
from lmjax.key_paths import path_name


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a pure function of the step.

    cosine: linear warmup to `lr`, cosine decay to `lr * min_lr_ratio` at `decay_steps`.
    wsd: warmup, constant, then linear decay over the last `wsd_decay_fraction` of the run.
    constant: warmup, then constant.
    """
    decay_steps = cfg.decay_steps or total_steps
    warmup = min(cfg.warmup_steps, max(decay_steps - 1, 0))
    floor = cfg.lr * cfg.min_lr_ratio
    ramp = optax.linear_schedule(0.0, cfg.lr, max(warmup, 1))
    if cfg.schedule == "constant":
        rest = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        rest = optax.cosine_decay_schedule(
            cfg.lr, max(decay_steps - warmup, 1), alpha=cfg.min_lr_ratio
        )
    elif cfg.schedule == "wsd":
        decay_len = max(int(round(decay_steps * cfg.wsd_decay_fraction)), 1)
        stable_len = max(decay_steps - warmup - decay_len, 0)
        rest = optax.join_schedules(
            [optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, floor, decay_len)],
            [stable_len],
        )
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if warmup == 0:
        return rest
    return optax.join_schedules([ramp, rest], [warmup])


def weight_decay_mask(params: Any, cfg: OptimConfig) -> Any:
    """True for the leaves that get weight decay: matrices, not norms or biases (nor
    embeddings)."""

    def decays(path, _):
        name = path_name(path)
        if "norm" in name or "bias" in name:
            return False
        if "embed" in name:  # embed and unembed
            return cfg.decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled decay scaled by the learning rate) after global-norm clipping."""
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda p: weight_decay_mask(p, cfg),
    )
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
