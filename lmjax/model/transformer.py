"""A Llama-style decoder as a params pytree plus pure functions.

Parameters (layers stacked on a leading axis, scanned):
  embed       [vocab, embed]
  layers/attn_norm [layers, embed]      layers/mlp_norm [layers, embed]
  layers/wq   [layers, embed, heads, head_dim]
  layers/wk   [layers, embed, kv_heads, head_dim]
  layers/wv   [layers, embed, kv_heads, head_dim]
  layers/wo   [layers, heads, head_dim, embed]
  layers/w_gate, layers/w_up [layers, embed, mlp]      layers/w_down [layers, mlp, embed]
  final_norm  [embed]
  unembed     [embed, vocab]  (absent when the embedding is tied)

`param_axes(cfg)` gives the same tree with a tuple of logical axis names per leaf; the
sharding rules map those names onto mesh axes. RoPE uses the rotate-half convention of
Hugging Face Llama checkpoints, so their q/k weights load without permutation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lmjax.config import ConfigError, ModelConfig
from lmjax.model import attention as attn_lib, matmul
from lmjax.model.matmul import dense
from lmjax.parallel.sharding import constrain

# Bump when the parameter tree changes shape or meaning; checkpoints record it.
PARAM_LAYOUT_VERSION = 1

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal", "out" (normal scaled by depth) or "ones"


def param_specs(cfg: ModelConfig) -> dict[str, Any]:
    """The single table of parameter shapes, logical axes and initializers."""
    L, D, H, K, Dh, F, V = (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.d_mlp,
        cfg.vocab_size,
    )
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": {
            "attn_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
            "wq": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), "normal"),
            "wk": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wv": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wo": ParamSpec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), "out"),
            "mlp_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
            "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
            "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
            "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "out"),
        },
        "final_norm": ParamSpec((D,), ("embed",), "ones"),
    }
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Same tree as the params, each leaf the tuple of its logical axis names."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Same tree as the params, each leaf a `jax.ShapeDtypeStruct`."""
    dtype = jnp.dtype(cfg.param_dtype)
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg), is_leaf=_is_spec
    )


def check_param_shapes(cfg: ModelConfig, params: Any) -> None:
    """A ConfigError unless `params` (arrays of any kind) has exactly the tree and shapes of
    `param_shapes(cfg)`."""
    want = jax.tree.map(lambda s: tuple(s.shape), param_shapes(cfg))
    try:
        got = jax.tree.map(lambda a: tuple(np.shape(a)), params)
    except (AttributeError, TypeError):
        got = None
    if got != want:
        raise ConfigError(
            f"params do not match the model config: expected shapes {want}, got {got}"
        )


def count_params(cfg: ModelConfig, *, include_embed: bool = True) -> int:
    specs = param_specs(cfg)
    n = sum(math.prod(s.shape) for s in jax.tree.leaves(specs, is_leaf=_is_spec))
    return n if include_embed else n - math.prod(specs["embed"].shape)


def init(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters: normal(init_std), output projections scaled by 1/sqrt(2 layers)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(rng, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

    def one(spec: ParamSpec, key):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        std = out_std if spec.init == "out" else cfg.init_std
        return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


# ---------------------------------------------------------------- building blocks


def rms_norm(x, weight, eps: float):
    """x: [..., embed] -> same shape and dtype; statistics in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    w = weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + weight.shape)
    return (y * w).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig):
    """Inverse frequencies [head_dim // 2], with Llama-3.1 scaling when configured."""
    inv = 1.0 / (
        cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim)
    )
    if cfg.rope_scaling_factor <= 0:
        return inv
    factor, lo, hi, old = (
        cfg.rope_scaling_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_max_len,
    )
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return jnp.where(wavelen < old / hi, inv, jnp.where(wavelen > old / lo, inv / factor, blended))


def rope_tables(positions, cfg: ModelConfig):
    """positions: [batch, seq] int -> (sin, cos), each [batch, seq, 1, head_dim // 2] f32."""
    angles = positions.astype(jnp.float32)[:, :, None] * rope_frequencies(cfg)[None, None, :]
    return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def apply_rope(x, sin, cos):
    """x: [batch, seq, heads, head_dim], rotate-half convention -> same shape and dtype."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def qkv_projection(x, layer: Params, sin, cos, impl: str):
    """x: [batch, seq, embed] -> q [b, s, heads, head_dim], k, v [b, s, kv_heads, head_dim].
    `impl`: the resolved matmul implementation (`lmjax.model.matmul`)."""
    q = dense(x, layer["wq"], impl=impl)
    k = dense(x, layer["wk"], impl=impl)
    v = dense(x, layer["wv"], impl=impl)
    q = constrain(apply_rope(q, sin, cos), ("act_batch", "act_seq", "act_heads", None))
    k = constrain(apply_rope(k, sin, cos), ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
    return checkpoint_name(q, "qkv"), checkpoint_name(k, "qkv"), checkpoint_name(v, "qkv")


def output_projection(ctx, layer: Params, impl: str):
    """ctx: [batch, seq, heads, head_dim] -> [batch, seq, embed]."""
    return dense(ctx, layer["wo"], contract=2, impl=impl)


def mlp(x, layer: Params, impl: str):
    """SwiGLU. x: [batch, seq, embed] -> [batch, seq, embed]."""
    gate = dense(x, layer["w_gate"], impl=impl)
    up = dense(x, layer["w_up"], impl=impl)
    hidden = constrain(jax.nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
    return dense(hidden, layer["w_down"], impl=impl)


def decoder_layer(x, layer: Params, sin, cos, attend: Callable, cfg: ModelConfig):
    """One pre-norm decoder layer around a pluggable attention.

    `attend(q, k, v) -> (ctx, aux)` with q [batch, seq, heads, head_dim], k, v
    [batch, seq, kv_heads, head_dim] and ctx like q; `aux` (e.g. an updated KV cache) is
    passed through. Returns (x [batch, seq, embed], aux).
    """
    impl = matmul.resolve_impl(cfg.matmul, cfg.dtype)
    # The named scopes label the ops in profiles (and HLO metadata); they change no numerics.
    with jax.named_scope("attention"):
        h = rms_norm(x, layer["attn_norm"], cfg.norm_eps)
        q, k, v = qkv_projection(h, layer, sin, cos, impl)
        ctx, aux = attend(q, k, v)
        ctx = checkpoint_name(ctx, "attn_out")
        x = x + output_projection(ctx, layer, impl)
    with jax.named_scope("mlp"):
        x = x + mlp(rms_norm(x, layer["mlp_norm"], cfg.norm_eps), layer, impl)
    return constrain(x, ("act_batch", "act_seq", "act_embed")), aux


def block(x, layer: Params, sin, cos, segment_ids, cfg: ModelConfig):
    """One pre-norm decoder layer. x: [batch, seq, embed] -> same."""

    def attend(q, k, v):
        return attn_lib.attention(q, k, v, segment_ids=segment_ids, impl=cfg.attention), None

    return decoder_layer(x, layer, sin, cos, attend, cfg)[0]


_REMAT_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(matmul.DENSE_NAME),
    ),
    "save_attn": jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
}


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy], prevent_cse=False)


def embed(params: Params, tokens, cfg: ModelConfig):
    """tokens: [batch, seq] int -> [batch, seq, embed] in the compute dtype."""
    x = jnp.take(params["embed"], tokens, axis=0).astype(cfg.dtype)
    return constrain(x, ("act_batch", "act_seq", "act_embed"))


def vocab_projection(params: Params, cfg: ModelConfig):
    """The [embed, vocab] matrix from final hidden states to logits (the tied embedding or not)."""
    return params["embed"].T if cfg.tie_embeddings else params["unembed"]


def unembed(params: Params, x, cfg: ModelConfig):
    """x: [batch, seq, embed] -> float32 logits [batch, seq, vocab] (final norm included)."""
    x = rms_norm(x, params["final_norm"], cfg.norm_eps)
    w = vocab_projection(params, cfg)
    logits = jnp.einsum("bsd,dv->bsv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_seq", "act_vocab"))


def hidden_states(params: Params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None):
    """The decoder stack before the final norm. tokens: [batch, seq] -> [batch, seq, embed]."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    sin, cos = rope_tables(positions, cfg)
    x = embed(params, tokens, cfg)

    def step(x, layer):
        return block(x, layer, sin, cos, segment_ids, cfg), None

    step = _remat(step, cfg.remat)
    if cfg.scan_layers:
        x, _ = jax.lax.scan(step, x, params["layers"])
    else:
        for i in range(cfg.n_layers):
            x, _ = step(x, jax.tree.map(lambda p, i=i: p[i], params["layers"]))
    return x


def forward(params: Params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None):
    """Next-token logits.

    Args:
      params: the tree from `init`.
      tokens: [batch, seq] int token ids.
      segment_ids: [batch, seq] int document ids for packed sequences (attention never
        crosses documents); None for one document per row.
      positions: [batch, seq] int positions (restarting per document); None: 0..seq-1.
    Returns:
      [batch, seq, vocab] float32 logits.
    """
    x = hidden_states(params, tokens, cfg, segment_ids=segment_ids, positions=positions)
    return unembed(params, x, cfg)
