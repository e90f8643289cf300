"""An independent pure-numpy forward of Hugging Face's Llama, Mistral, Qwen2, Qwen3, Gemma 2
and Gemma 3 (text) causal LMs, written in Hugging Face conventions.

It reads tensors by their HF names (`model.layers.{i}.self_attn.q_proj.weight`, ...),
treats every Linear weight as `[out, in]` (y = x @ W.T + b), and applies RoPE in the
rotate-half form of HF's `LlamaForCausalLM`. The family features follow each HF modeling
file, keyed by config.json's `model_type`:
  qwen2: q/k/v projections with biases. qwen3: RMSNorm over head_dim on q and k before RoPE.
  mistral: every layer attends to the last `sliding_window` positions (q - k < window).
  gemma2 / gemma3_text: RMSNorm scaling by (1 + w); embeddings times sqrt(hidden_size);
  gelu_pytorch_tanh gate; norms after attention (`post_attention_layernorm`) and after the
  MLP; scores scaled by query_pre_attn_scalar**-0.5 and soft-capped (gemma2:
  attn_logit_softcapping, final_logit_softcapping); sliding layers (gemma2: even layers;
  gemma3: all but every sliding_window_pattern-th, or `layer_types`). gemma3 adds (1 + w)
  q/k norms and a local RoPE base `rope_local_base_freq` for sliding layers, the global
  layers keeping `rope_theta` and `rope_scaling` ("linear": frequencies / factor).
  mixtral / qwen3_moe: the MLP is a mixture of experts (router `block_sparse_moe.gate` /
  `mlp.gate`, experts `...experts.{j}.w1/w3/w2` / `gate_proj/up_proj/down_proj`), the top
  `num_experts_per_tok` of the softmax over all experts, renormalized for mixtral and where
  qwen3_moe's `norm_topk_prob` says so (the loop of tests/numpy_moe.py).
It shares no code with lmjax, so the tests can hold lmjax (and its HF converter) against
it. Everything is computed in float64.
"""

from __future__ import annotations

import math

import numpy as np

from tests import numpy_moe

# model_type -> (router, experts' prefix, their gate, up and down projections) in HF names.
MOE = {
    "mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp.gate", "mlp.experts", "gate_proj", "up_proj", "down_proj"),
}


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


def inverse_frequencies(config: dict, sliding: bool = False):
    """[head_dim // 2] RoPE inverse frequencies from an HF config dict (of a sliding layer's
    own rotary embedding in Gemma 3)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if sliding and config.get("model_type") == "gemma3_text":
        theta = config["rope_local_base_freq"]
        return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    theta = config.get("rope_theta", 10000.0)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = config.get("rope_scaling")
    if scaling and scaling["rope_type"] == "linear":
        return inv / scaling["factor"]
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


def rms_norm(x, weight, eps, gemma: bool = False):
    """x: [..., hidden] -> x / rms(x) * weight (Gemma: * (1 + weight))."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (weight + gemma)


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


def gelu_pytorch_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softcap(x, cap):
    """HF's soft-capping: x / cap, tanh, * cap; None or 0 leaves x unchanged."""
    return np.tanh(x / cap) * cap if cap else x


def attention(q, k, v, allowed, scaling=None, cap=None):
    """One sequence, a loop over query heads.

    q: [seq, heads, head_dim]; k, v: [seq, kv_heads, head_dim];
    allowed: [seq, seq] bool (query, key) -> [seq, heads, head_dim].
    Query head h reads key/value head h // (heads // kv_heads), as HF `repeat_kv` does.
    scaling: the factor on q . k (None: head_dim**-0.5); cap: soft cap of the scores.
    """
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    group = heads // kv_heads
    scaling = head_dim**-0.5 if scaling is None else scaling
    out = np.zeros_like(q)
    for h in range(heads):
        scores = softcap(q[:, h, :] @ k[:, h // group, :].T * scaling, cap)
        scores = np.where(allowed, scores, -np.inf)
        out[:, h, :] = softmax(scores) @ v[:, h // group, :]
    return out


GEMMA = ("gemma2", "gemma3_text")


def sliding_layers(config: dict) -> list[bool]:
    """Per layer, True where HF's model attends within `sliding_window`."""
    n, kind = config["num_hidden_layers"], config.get("model_type", "llama")
    if config.get("layer_types"):
        return [t == "sliding_attention" for t in config["layer_types"]]
    if kind == "mistral" and config.get("sliding_window"):
        return [True] * n
    if kind == "gemma2":
        return [i % 2 == 0 for i in range(n)]
    if kind == "gemma3_text":
        return [(i + 1) % config.get("sliding_window_pattern", 6) != 0 for i in range(n)]
    return [False] * n


def _project(w, p, name, h, heads, head_dim, config):
    """HF's `{name}_proj(h).view(seq, heads, head_dim)`, then q_norm/k_norm where the model
    has them (Qwen3, Gemma 3)."""
    y = h @ w[p + f"self_attn.{name}_proj.weight"].T
    if p + f"self_attn.{name}_proj.bias" in w:
        y = y + w[p + f"self_attn.{name}_proj.bias"]
    y = y.reshape(h.shape[0], heads, head_dim)
    if name != "v" and p + f"self_attn.{name}_norm.weight" in w:
        gemma = config.get("model_type") in GEMMA
        y = rms_norm(y, w[p + f"self_attn.{name}_norm.weight"], config["rms_norm_eps"], gemma)
    return y


def _layer(w, p, x, pos, allowed, sliding, config):
    """One decoder layer of one sequence. x: [seq, hidden] -> same."""
    seq = x.shape[0]
    n_heads = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    eps, gemma = config["rms_norm_eps"], config.get("model_type") in GEMMA
    inv_freq = inverse_frequencies(config, sliding)
    h = rms_norm(x, w[p + "input_layernorm.weight"], eps, gemma)
    q = _project(w, p, "q", h, n_heads, head_dim, config)
    k = _project(w, p, "k", h, n_kv, head_dim, config)
    v = _project(w, p, "v", h, n_kv, head_dim, config)
    q, k = apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq)
    if sliding:
        index = np.arange(seq)
        allowed = allowed & (index[:, None] - index[None, :] < config["sliding_window"])
    scaling = config["query_pre_attn_scalar"] ** -0.5 if gemma else None
    cap = config.get("attn_logit_softcapping") if gemma else None
    ctx = attention(q, k, v, allowed, scaling, cap).reshape(seq, n_heads * head_dim)
    out = ctx @ w[p + "self_attn.o_proj.weight"].T
    if gemma:
        x = x + rms_norm(out, w[p + "post_attention_layernorm.weight"], eps, True)
        h = rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps, True)
    else:
        x = x + out
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
    if config.get("model_type") in MOE:
        return x + _moe_mlp(w, p, h, config)
    act = gelu_pytorch_tanh if gemma else silu
    gate = h @ w[p + "mlp.gate_proj.weight"].T
    up = h @ w[p + "mlp.up_proj.weight"].T
    out = (act(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    if gemma:
        out = rms_norm(out, w[p + "post_feedforward_layernorm.weight"], eps, True)
    return x + out


def _moe_mlp(w, p, h, config):
    """The mixture-of-experts MLP of one sequence. h: [seq, hidden] -> same."""
    router, experts, gate, up, down = MOE[config["model_type"]]
    n = _n_experts(config)
    stack = lambda name: np.stack([w[p + f"{experts}.{j}.{name}.weight"].T for j in range(n)])
    layer = {
        "router": w[p + router + ".weight"].T,
        "w_gate": stack(gate),
        "w_up": stack(up),
        "w_down": stack(down),
    }
    renorm = config["model_type"] == "mixtral" or config.get("norm_topk_prob", False)
    router = "softmax_topk_renorm" if renorm else "softmax_topk"
    return numpy_moe.moe_mlp(h, layer, top_k=config["num_experts_per_tok"], router=router)[0]


def _n_experts(config: dict) -> int:
    return config["num_local_experts" if config["model_type"] == "mixtral" else "num_experts"]


def forward(tensors: dict, config: dict, tokens, *, positions=None, segment_ids=None):
    """Logits of the HF `...ForCausalLM` of `config["model_type"]` (default llama) for one
    batch.

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
    gemma = config.get("model_type") in GEMMA
    if positions is None:
        positions = np.broadcast_to(np.arange(seq), (batch, seq))
    if segment_ids is None:
        segment_ids = np.zeros((batch, seq), np.int64)
    causal = np.tril(np.ones((seq, seq), bool))
    lm_head = (
        w["model.embed_tokens.weight"]
        if config.get("tie_word_embeddings", gemma)
        else w["lm_head.weight"]
    )
    sliding = sliding_layers(config)

    logits = []
    for b in range(batch):
        x = w["model.embed_tokens.weight"][tokens[b]]  # [seq, hidden]
        if gemma:
            x = x * config["hidden_size"] ** 0.5
        pos = np.asarray(positions[b])
        allowed = causal & (segment_ids[b][:, None] == segment_ids[b][None, :])
        for i in range(config["num_hidden_layers"]):
            x = _layer(w, f"model.layers.{i}.", x, pos, allowed, sliding[i], config)
        x = rms_norm(x, w["model.norm.weight"], config["rms_norm_eps"], gemma)
        cap = config.get("final_logit_softcapping") if gemma else None
        logits.append(softcap(x @ lm_head.T, cap))
    return np.stack(logits)


def random_checkpoint(config: dict, seed: int = 0, std: float = 0.1) -> dict:
    """A random HF state dict (float32) for `config` (of its `model_type`), named and shaped
    as HF does.

    Norm scales are drawn around 1 (Gemma's w around 0, its scale being 1 + w) so that a
    transposed or swapped norm would show; biases around 0.
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

    kind = config.get("model_type", "llama")
    gemma = kind in GEMMA

    def norm_weight(dim=hidden):
        return (float(not gemma) + 0.2 * rng.standard_normal(dim)).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": norm_weight()}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm_weight()
        t[p + "post_attention_layernorm.weight"] = norm_weight()
        t[p + "self_attn.q_proj.weight"] = normal(n_heads * head_dim, hidden)
        t[p + "self_attn.k_proj.weight"] = normal(n_kv * head_dim, hidden)
        t[p + "self_attn.v_proj.weight"] = normal(n_kv * head_dim, hidden)
        t[p + "self_attn.o_proj.weight"] = normal(hidden, n_heads * head_dim)
        if kind in MOE:
            router, experts, gate, up, down = MOE[kind]
            width = config.get("moe_intermediate_size", mlp_dim)
            t[p + router + ".weight"] = normal(_n_experts(config), hidden)
            for j in range(_n_experts(config)):
                t[p + f"{experts}.{j}.{gate}.weight"] = normal(width, hidden)
                t[p + f"{experts}.{j}.{up}.weight"] = normal(width, hidden)
                t[p + f"{experts}.{j}.{down}.weight"] = normal(hidden, width)
        else:
            t[p + "mlp.gate_proj.weight"] = normal(mlp_dim, hidden)
            t[p + "mlp.up_proj.weight"] = normal(mlp_dim, hidden)
            t[p + "mlp.down_proj.weight"] = normal(hidden, mlp_dim)
        if kind == "qwen2":
            for name, rows in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
                t[p + f"self_attn.{name}_proj.bias"] = normal(rows * head_dim)
        if kind in ("qwen3", "qwen3_moe", "gemma3_text"):
            t[p + "self_attn.q_norm.weight"] = norm_weight(head_dim)
            t[p + "self_attn.k_norm.weight"] = norm_weight(head_dim)
        if gemma:
            t[p + "pre_feedforward_layernorm.weight"] = norm_weight()
            t[p + "post_feedforward_layernorm.weight"] = norm_weight()
    if not config.get("tie_word_embeddings", gemma):
        t["lm_head.weight"] = normal(vocab, hidden)
    return t
