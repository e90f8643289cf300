"""FLOPs per token of a model: what training computes (6N plus causal attention, for MFU) and
what a remat policy makes the backward pass recompute (for the step-time model)."""

from __future__ import annotations

from lmjax.config import ModelConfig
from lmjax.model import transformer


def attended_keys(cfg: ModelConfig, seq_len: int) -> float:
    """Keys a query attends to, on average over the sequence, summed over the layers: seq/2
    for a causal global layer (the square's half); for a local layer with window w < seq,
    w - w**2 / (2 seq), the band of width w less the triangle its first queries miss."""
    w, half = cfg.sliding_window, seq_len / 2
    local = w - w * w / (2 * seq_len) if 0 < w < seq_len else half
    return sum(local if is_local else half for is_local in transformer.layer_is_local(cfg))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params (with mixture of experts, the active ones:
    moe_top_k of the moe_experts experts, plus router and shared expert), plus causal
    attention counted once per (query, key) pair: 3 passes x 2 matmuls x 2 flops x heads x
    head_dim per attended key. Capacity-mode padding and dropped copies are not counted."""
    n_matmul = transformer.count_params(cfg, include_embed=False, active=True)
    if cfg.tie_embeddings:  # the tied embedding still costs a vocab projection
        n_matmul += cfg.vocab_size * cfg.d_model
    attention = 12 * cfg.n_heads * cfg.head_dim * attended_keys(cfg, seq_len)
    return 6.0 * n_matmul + attention


def remat_recompute_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token that the backward pass recomputes under `cfg.remat`.

    none: nothing. full: each layer's whole forward (projections, MLP, attention).
    save_dots: the attention scores and context (dots with batch dimensions are not saved;
    the projections are). save_attn: the output projection, the MLP and the attention core
    (only the named q/k/v and attention output are kept). The loss is never recomputed.
    """
    proj = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    out_proj = cfg.d_model * cfg.head_dim * cfg.n_heads
    mlp = mlp_params_per_layer(cfg)
    attention = 4 * cfg.n_heads * cfg.head_dim * attended_keys(cfg, seq_len)  # all layers
    per_layer = {
        "none": 0.0,
        "full": 2.0 * (proj + mlp),
        "save_dots": 0.0,
        "save_attn": 2.0 * (out_proj + mlp),
    }[cfg.remat]
    return cfg.n_layers * per_layer + (attention if cfg.remat != "none" else 0.0)


def mlp_params_per_layer(cfg: ModelConfig) -> float:
    """MLP weights one token multiplies with, on average over the layers: 3 x d_model x d_mlp
    in a dense layer; in an MoE layer moe_top_k experts, the router and the shared expert."""
    dense = 3 * cfg.d_model * cfg.d_mlp
    moe = cfg.d_model * (
        3 * cfg.moe_top_k * (cfg.moe_d_mlp or cfg.d_mlp)
        + cfg.moe_experts
        + 3 * cfg.moe_shared_d_mlp
    )
    kinds = transformer.layer_is_moe(cfg)
    return sum(moe if is_moe else dense for is_moe in kinds) / cfg.n_layers
