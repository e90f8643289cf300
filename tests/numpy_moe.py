"""An independent float64 numpy mixture-of-experts MLP: a plain loop over tokens and their
chosen experts, written from the definitions (Mixtral's and Qwen3-MoE's router, Switch-style
capacity), not from lmjax/model/moe.py."""

import numpy as np


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu(x, w_gate, w_up, w_down):
    return (_silu(x @ w_gate) * (x @ w_up)) @ w_down


def moe_mlp(x, p, *, top_k: int, renorm: bool, capacity: int | None = None):
    """x: [tokens, embed] float64; p: numpy params of one MoE layer (router [embed, experts],
    w_gate/w_up [experts, embed, f], w_down [experts, f, embed], optional shared_*).

    Returns (y [tokens, embed], dropped copies). With `capacity`, copies are admitted in
    priority order (every token's first choice in token order, then every second choice, ...)
    while their expert has fewer than `capacity`; the others add nothing.
    """
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n_tokens, n_experts = probs.shape
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    if renorm:
        weights = weights / weights.sum(-1, keepdims=True)
    admitted = np.ones((n_tokens, top_k), bool)
    if capacity is not None:
        held = np.zeros(n_experts, int)
        for j in range(top_k):
            for t in range(n_tokens):
                e = chosen[t, j]
                admitted[t, j] = held[e] < capacity
                held[e] += admitted[t, j]
    y = np.zeros_like(x)
    for t in range(n_tokens):
        for j in range(top_k):
            if admitted[t, j]:
                e = chosen[t, j]
                y[t] += weights[t, j] * _swiglu(x[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
        if "shared_gate" in p:
            y[t] += _swiglu(x[t], p["shared_gate"], p["shared_up"], p["shared_down"])
    return y, int((~admitted).sum())
