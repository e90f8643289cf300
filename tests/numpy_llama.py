"""An independent pure-numpy Llama forward, written in Hugging Face conventions.

It reads tensors by their HF names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
treats every Linear weight as `[out, in]` (y = x @ W.T), and applies RoPE in the
rotate-half form of HF's `LlamaForCausalLM`. It shares no code with lmjax, so the tests
can hold lmjax (and its HF converter) against it. Everything is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np


def llama3_scaled_frequencies(
    inv_freq, factor, low_freq_factor, high_freq_factor, original_max_len
):
    """The Llama-3.1 RoPE frequency scaling, transcribed frequency by frequency from the
    published reference (`apply_scaling` in Meta's llama-models)."""
    low_freq_wavelen = original_max_len / low_freq_factor
    high_freq_wavelen = original_max_len / high_freq_factor
    out = []
    for freq in inv_freq:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (original_max_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out, dtype=np.float64)


def inverse_frequencies(config: dict):
    """[head_dim // 2] RoPE inverse frequencies from an HF config dict."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = config.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = config.get("rope_scaling")
    if scaling:
        assert scaling["rope_type"] == "llama3", scaling
        inv = llama3_scaled_frequencies(
            inv,
            scaling["factor"],
            scaling["low_freq_factor"],
            scaling["high_freq_factor"],
            scaling["original_max_position_embeddings"],
        )
    return inv


def rms_norm(x, weight, eps):
    """x: [..., hidden] -> x / rms(x) * weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, positions, inv_freq):
    """x: [seq, heads, head_dim]; positions: [seq] -> x rotated by position * inv_freq."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [seq, head_dim/2]
    emb = np.concatenate([angles, angles], axis=-1)[:, None, :]  # [seq, 1, head_dim]
    return x * np.cos(emb) + rotate_half(x) * np.sin(emb)


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def silu(x):
    return x / (1.0 + np.exp(-x))


def attention(q, k, v, allowed):
    """One sequence, a loop over query heads.

    q: [seq, heads, head_dim]; k, v: [seq, kv_heads, head_dim];
    allowed: [seq, seq] bool (query, key) -> [seq, heads, head_dim].
    Query head h reads key/value head h // (heads // kv_heads), as HF `repeat_kv` does.
    """
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    group = heads // kv_heads
    out = np.zeros_like(q)
    for h in range(heads):
        scores = q[:, h, :] @ k[:, h // group, :].T / math.sqrt(head_dim)
        scores = np.where(allowed, scores, -np.inf)
        out[:, h, :] = softmax(scores) @ v[:, h // group, :]
    return out


def forward(tensors: dict, config: dict, tokens, *, positions=None, segment_ids=None):
    """Logits of `LlamaForCausalLM` for one batch.

    Args:
      tensors: HF state dict, name -> array (any float dtype).
      config: the HF `config.json` as a dict.
      tokens: [batch, seq] ints.
      positions: [batch, seq] RoPE positions; None: 0..seq-1.
      segment_ids: [batch, seq] document ids; tokens attend only within their document.
    Returns:
      [batch, seq, vocab] float64 logits.
    """
    w = {name: np.asarray(t, dtype=np.float64) for name, t in tensors.items()}
    tokens = np.asarray(tokens)
    batch, seq = tokens.shape
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    eps = config["rms_norm_eps"]
    inv_freq = inverse_frequencies(config)
    if positions is None:
        positions = np.broadcast_to(np.arange(seq), (batch, seq))
    if segment_ids is None:
        segment_ids = np.zeros((batch, seq), np.int64)
    causal = np.tril(np.ones((seq, seq), bool))
    lm_head = (
        w["model.embed_tokens.weight"]
        if config.get("tie_word_embeddings", False)
        else w["lm_head.weight"]
    )

    logits = []
    for b in range(batch):
        x = w["model.embed_tokens.weight"][tokens[b]]  # [seq, hidden]
        pos = np.asarray(positions[b])
        allowed = causal & (segment_ids[b][:, None] == segment_ids[b][None, :])
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(seq, n_heads, head_dim)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(seq, n_kv, head_dim)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(seq, n_kv, head_dim)
            q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
            ctx = attention(q, k, v, allowed).reshape(seq, n_heads * head_dim)
            x = x + ctx @ w[p + "self_attn.o_proj.weight"].T
            h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            x = x + (silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        x = rms_norm(x, w["model.norm.weight"], eps)
        logits.append(x @ lm_head.T)
    return np.stack(logits)


def random_checkpoint(config: dict, seed: int = 0, std: float = 0.1) -> dict:
    """A random HF Llama state dict (float32) for `config`, named and shaped as HF does.

    Norm weights are drawn around 1 so that a transposed or swapped norm would show.
    """
    rng = np.random.default_rng(seed)
    hidden, mlp_dim, vocab = (
        config["hidden_size"],
        config["intermediate_size"],
        config["vocab_size"],
    )
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    head_dim = config.get("head_dim") or hidden // n_heads

    def normal(*shape):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.2 * rng.standard_normal(hidden)).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": norm_weight()}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm_weight()
        t[p + "post_attention_layernorm.weight"] = norm_weight()
        t[p + "self_attn.q_proj.weight"] = normal(n_heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = normal(n_kv * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = normal(n_kv * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = normal(hidden, n_heads * head_dim)
        t[p + "mlp.gate_proj.weight"] = normal(mlp_dim, hidden)
        t[p + "mlp.up_proj.weight"] = normal(mlp_dim, hidden)
        t[p + "mlp.down_proj.weight"] = normal(hidden, mlp_dim)
    if not config.get("tie_word_embeddings", False):
        t["lm_head.weight"] = normal(vocab, hidden)
    return t
