"""An independent float64 numpy mixture-of-experts MLP: a plain loop over tokens and their
chosen experts, written from the definitions (Mixtral's, Qwen3-MoE's and DeepSeek-V3's
router, Switch-style capacity, DeepSeek-V3's bias rule), not from lmjax/model/moe.py."""

import numpy as np


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _swiglu(x, w_gate, w_up, w_down):
    return (_silu(x @ w_gate) * (x @ w_up)) @ w_down


def route(x, p, *, top_k: int, router: str, scale: float = 1.0):
    """x: [tokens, embed] -> (chosen [tokens, top_k] best first, their weights). softmax_*:
    the k most probable experts; sigmoid_topk_bias: the k largest sigmoid(logit) + bias,
    weighted by their sigmoid(logit) over the k's sum. Weights times `scale`."""
    logits = x @ p["router"]
    if router == "sigmoid_topk_bias":
        scores = 1.0 / (1.0 + np.exp(-logits))
        rank = scores + p["router_bias"]
    else:
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        rank = scores
    chosen = np.argsort(-rank, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, chosen, axis=-1)
    if router != "softmax_topk":
        weights = weights / weights.sum(-1, keepdims=True)
    return chosen, scale * weights


def bias_after_step(bias, counts, rate: float):
    """bias [experts] after a step in which expert e received counts[e] copies: each bias
    rises by `rate` when its expert got fewer copies than the experts' mean, falls by `rate`
    when more, stays when equal."""
    bias = np.array(bias, np.float64)
    for e, n in enumerate(counts):
        if n < np.mean(counts):
            bias[e] += rate
        elif n > np.mean(counts):
            bias[e] -= rate
    return bias


def moe_mlp(x, p, *, top_k: int, router: str, capacity: int | None = None, scale: float = 1.0):
    """x: [tokens, embed] float64; p: numpy params of one MoE layer (router [embed, experts],
    router_bias [experts] for sigmoid_topk_bias, w_gate/w_up [experts, embed, f], w_down
    [experts, f, embed], optional shared_*); `router` one of config.MOE_ROUTERS.

    Returns (y [tokens, embed], dropped copies). With `capacity`, copies are admitted in
    priority order (every token's first choice in token order, then every second choice, ...)
    while their expert has fewer than `capacity`; the others add nothing.
    """
    chosen, weights = route(x, p, top_k=top_k, router=router, scale=scale)
    n_tokens, n_experts = x.shape[0], p["router"].shape[1]
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
