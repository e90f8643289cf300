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
and, when the model-family switches of `ModelConfig` ask for them:
  layers/q_bias [layers, heads, head_dim], layers/k_bias, layers/v_bias [layers, kv_heads,
    head_dim]  (qkv_bias)
  layers/q_norm, layers/k_norm [layers, head_dim]  (qk_norm)
  layers/attn_post_norm, layers/mlp_post_norm [layers, embed]  (post_norms)
With mixture-of-experts (moe_experts > 0) the MLP weights leave `layers`: the dense layers'
w_gate, w_up, w_down sit in `dense_mlp` [dense layers, ...] and the MoE layers' router and
experts in `moe` [moe layers, ...] (lmjax/model/moe.py); runs of layers of one kind are
scanned in turn (`layer_runs`).

`param_axes(cfg)` gives the same tree with a tuple of logical axis names per leaf; the
sharding rules map those names onto mesh axes. RoPE uses the rotate-half convention of
Hugging Face Llama checkpoints, so their q/k weights load without permutation.

One set of blocks serves every family: Qwen's biases and QK-norm, Mistral's and Gemma's
sliding-window layers (`layer_is_local`), Gemma's (1 + w) norms, scaled embeddings, GeGLU,
post-norms and soft caps are config switches, never a copy of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lmjax.config import ConfigError, ModelConfig, moe_layer
from lmjax.model import attention as attn_lib, matmul, moe as moe_lib
from lmjax.model.matmul import dense
from lmjax.parallel.sharding import constrain

# Bump when the parameter tree changes shape or meaning; checkpoints record it.
PARAM_LAYOUT_VERSION = 1

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # None: a dimension no rule shards
    init: str  # "normal", "out" (normal scaled by depth), "ones" or "zeros"


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
    specs: dict[str, Any] = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": {
            "attn_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
            "wq": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), "normal"),
            "wk": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wv": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
            "wo": ParamSpec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), "out"),
            "mlp_norm": ParamSpec((L, D), ("layers", "embed"), "ones"),
        },
        "final_norm": ParamSpec((D,), ("embed",), "ones"),
    }
    n_moe = sum(layer_is_moe(cfg))
    if n_moe == 0:
        specs["layers"].update(_mlp_specs(L, D, F))
    else:
        if n_moe < L:
            specs["dense_mlp"] = _mlp_specs(L - n_moe, D, F)
        specs["moe"] = _moe_specs(cfg, n_moe)
    specs["layers"].update(_family_specs(cfg))
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    if cfg.norm_offset:  # (1 + w) norms start at w = 0, the same identity scale
        specs = jax.tree.map(
            lambda s: dataclasses.replace(s, init="zeros") if s.init == "ones" else s,
            specs,
            is_leaf=_is_spec,
        )
    return specs


def _mlp_specs(n: int, D: int, F: int) -> dict[str, ParamSpec]:
    """The SwiGLU weights of n stacked layers."""
    return {
        "w_gate": ParamSpec((n, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_up": ParamSpec((n, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_down": ParamSpec((n, F, D), ("layers", "mlp", "embed"), "out"),
    }


def _moe_specs(cfg: ModelConfig, n: int) -> dict[str, ParamSpec]:
    """The router, experts and shared expert of n stacked MoE layers."""
    D, E = cfg.d_model, cfg.moe_experts
    F = cfg.moe_d_mlp or cfg.d_mlp
    expert_in, expert_out = (
        ("layers", "expert", "embed", "mlp"),
        ("layers", "expert", "mlp", "embed"),
    )
    specs = {
        "router": ParamSpec((n, D, E), ("layers", "embed", None), "normal"),
        "w_gate": ParamSpec((n, E, D, F), expert_in, "normal"),
        "w_up": ParamSpec((n, E, D, F), expert_in, "normal"),
        "w_down": ParamSpec((n, E, F, D), expert_out, "out"),
    }
    if cfg.moe_router == "sigmoid_topk_bias":
        # Set by the train step (`moe.bias_update`), not trained; replicated, as the router is
        # over experts; "bias" in its name keeps it out of weight decay.
        specs["router_bias"] = ParamSpec((n, E), ("layers", None), "zeros")
    if cfg.moe_shared_d_mlp > 0:
        shared = _mlp_specs(n, D, cfg.moe_shared_d_mlp)
        specs.update({"shared_" + k[2:]: v for k, v in shared.items()})
    return specs


def _family_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The per-layer parameters that only some model families have."""
    L, D, H, K, Dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    specs = {}
    if cfg.qkv_bias:
        specs["q_bias"] = ParamSpec((L, H, Dh), ("layers", "heads", "head_dim"), "zeros")
        specs["k_bias"] = ParamSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
        specs["v_bias"] = ParamSpec((L, K, Dh), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        specs["q_norm"] = ParamSpec((L, Dh), ("layers", "head_dim"), "ones")
        specs["k_norm"] = ParamSpec((L, Dh), ("layers", "head_dim"), "ones")
    if cfg.post_norms:
        specs["attn_post_norm"] = ParamSpec((L, D), ("layers", "embed"), "ones")
        specs["mlp_post_norm"] = ParamSpec((L, D), ("layers", "embed"), "ones")
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


def count_params(cfg: ModelConfig, *, include_embed: bool = True, active: bool = False) -> int:
    """Parameters of the model; with `active`, those one token uses: of each expert stack
    (logical axis `expert`) only moe_top_k of moe_experts count."""
    specs = param_specs(cfg)

    def size(s: ParamSpec) -> float:
        n = math.prod(s.shape)
        return n * cfg.moe_top_k / cfg.moe_experts if active and "expert" in s.axes else n

    n = round(sum(size(s) for s in jax.tree.leaves(specs, is_leaf=_is_spec)))
    return n if include_embed else n - math.prod(specs["embed"].shape)


def init(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters: normal(init_std), output projections scaled by 1/sqrt(2 layers)."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(rng, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

    def one(spec: ParamSpec, key):
        if spec.init in ("ones", "zeros"):
            return jnp.full(spec.shape, 1.0 if spec.init == "ones" else 0.0, dtype)
        std = out_std if spec.init == "out" else cfg.init_std
        return (std * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


# ---------------------------------------------------------------- building blocks


def rms_norm(x, weight, eps: float, offset: bool = False):
    """x: [..., dim] -> same shape and dtype, scaled by weight (by 1 + weight with `offset`,
    Gemma's form); statistics in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    w = weight.astype(jnp.float32) + (1.0 if offset else 0.0)
    return (y * w.reshape((1,) * (x.ndim - 1) + weight.shape)).astype(x.dtype)


def norm(x, weight, cfg: ModelConfig):
    """`rms_norm` as the model configures it (eps, Gemma's offset)."""
    return rms_norm(x, weight, cfg.norm_eps, cfg.norm_offset)


def layer_is_local(cfg: ModelConfig) -> tuple[bool, ...]:
    """Per layer, True where it attends within `sliding_window` (local), False if global:
    with global_every n, layers n-1, 2n-1, ... are global, as Gemma 2 (n = 2) and Gemma 3
    (n = 6) alternate; with global_every 0 every layer is local (Mistral)."""
    if cfg.sliding_window <= 0:
        return (False,) * cfg.n_layers
    n = cfg.global_every
    return tuple(n <= 0 or (i + 1) % n != 0 for i in range(cfg.n_layers))


def scores_spec(cfg: ModelConfig, local: bool) -> attn_lib.Scores:
    """How a local or global layer forms its attention scores."""
    scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar > 0 else None
    window = cfg.sliding_window if local else 0
    return attn_lib.Scores(scale=scale, softcap=cfg.attn_softcap, window=window)


def rope_frequencies(cfg: ModelConfig, local: bool = False):
    """Inverse frequencies [head_dim // 2] of a global layer (with the configured scaling)
    or of a local one (from rope_local_theta, unscaled, when that is set)."""
    own_base = local and cfg.rope_local_theta > 0
    theta = cfg.rope_local_theta if own_base else cfg.rope_theta
    inv = 1.0 / (theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    if cfg.rope_scaling_factor <= 0 or own_base:
        return inv
    if cfg.rope_scaling_type == "linear":
        return inv / cfg.rope_scaling_factor
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


def rope_tables(positions, cfg: ModelConfig, local: bool = False):
    """positions: [batch, seq] int -> (sin, cos), each [batch, seq, 1, head_dim // 2] f32,
    for a global or a local layer (`rope_frequencies`)."""
    inv = rope_frequencies(cfg, local)
    angles = positions.astype(jnp.float32)[:, :, None] * inv[None, None, :]
    return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def apply_rope(x, sin, cos):
    """x: [batch, seq, heads, head_dim], rotate-half convention -> same shape and dtype."""
    half = x.shape[-1] // 2
    x1 = x[..., :half].astype(jnp.float32)
    x2 = x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _projection(x, layer: Params, name: str, cfg: ModelConfig, impl: str):
    """One of q, k, v ("q", ...): x [b, s, embed] -> [b, s, heads, head_dim], with its
    bias (qkv_bias) and, for q and k, its norm over head_dim (qk_norm)."""
    y = dense(x, layer["w" + name], impl=impl)
    if cfg.qkv_bias:
        y = y + layer[name + "_bias"].astype(y.dtype)[None, None]
    if cfg.qk_norm and name != "v":
        y = norm(y, layer[name + "_norm"], cfg)
    return y


def qkv_projection(x, layer: Params, sin, cos, cfg: ModelConfig, impl: str):
    """x: [batch, seq, embed] -> q [b, s, heads, head_dim], k, v [b, s, kv_heads, head_dim].
    `impl`: the resolved matmul implementation (`lmjax.model.matmul`)."""
    q, k, v = (_projection(x, layer, name, cfg, impl) for name in ("q", "k", "v"))
    q = constrain(apply_rope(q, sin, cos), ("act_batch", "act_seq", "act_heads", None))
    k = constrain(apply_rope(k, sin, cos), ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
    return checkpoint_name(q, "qkv"), checkpoint_name(k, "qkv"), checkpoint_name(v, "qkv")


def output_projection(ctx, layer: Params, impl: str):
    """ctx: [batch, seq, heads, head_dim] -> [batch, seq, embed]."""
    return dense(ctx, layer["wo"], contract=2, impl=impl)


_ACTIVATIONS: dict[str, Callable] = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def mlp(x, layer: Params, cfg: ModelConfig, impl: str):
    """SwiGLU, or GeGLU with mlp_activation gelu_tanh. x: [batch, seq, embed] -> same."""
    gate = dense(x, layer["w_gate"], impl=impl)
    up = dense(x, layer["w_up"], impl=impl)
    hidden = _ACTIVATIONS[cfg.mlp_activation](gate) * up
    hidden = constrain(hidden, ("act_batch", "act_seq", "act_mlp"))
    return dense(hidden, layer["w_down"], impl=impl)


def _post_norm(y, layer: Params, name: str, cfg: ModelConfig):
    """A sublayer's output [batch, seq, embed], normed by `name` when post_norms is set."""
    return norm(y, layer[name], cfg) if cfg.post_norms else y


def decoder_layer(x, layer: Params, sin, cos, attend: Callable, cfg: ModelConfig):
    """One pre-norm decoder layer around a pluggable attention (with post_norms, each
    sublayer's output is normed before its residual add); its MLP is the mixture of experts
    `layer["moe"]` where the layer has one.

    `attend(q, k, v) -> (ctx, aux)` with q [batch, seq, heads, head_dim], k, v
    [batch, seq, kv_heads, head_dim] and ctx like q; `aux` (e.g. an updated KV cache) is
    passed through. Returns (x [batch, seq, embed], aux, the MoE stats of `moe.moe_mlp` or
    None).
    """
    impl = matmul.resolve_impl(cfg.matmul, cfg.dtype)
    # The named scopes label the ops in profiles (and HLO metadata); they change no numerics.
    with jax.named_scope("attention"):
        h = norm(x, layer["attn_norm"], cfg)
        q, k, v = qkv_projection(h, layer, sin, cos, cfg, impl)
        ctx, aux = attend(q, k, v)
        ctx = checkpoint_name(ctx, "attn_out")
        x = x + _post_norm(output_projection(ctx, layer, impl), layer, "attn_post_norm", cfg)
    with jax.named_scope("mlp"):
        h = norm(x, layer["mlp_norm"], cfg)
        stats = None
        if "moe" in layer:
            h, stats = moe_lib.moe_mlp(h, layer["moe"], cfg)
        else:
            h = mlp(h, layer, cfg, impl)
        x = x + _post_norm(h, layer, "mlp_post_norm", cfg)
    return constrain(x, ("act_batch", "act_seq", "act_embed")), aux, stats


def block(x, layer: Params, sin, cos, segment_ids, cfg: ModelConfig, local: bool = False):
    """One pre-norm decoder layer, local (sliding window) or global. x: [batch, seq, embed]
    -> (same, the layer's MoE stats or None)."""
    spec = scores_spec(cfg, local)

    def attend(q, k, v):
        ctx = attn_lib.attention(q, k, v, segment_ids=segment_ids, impl=cfg.attention, spec=spec)
        return ctx, None

    x, _, stats = decoder_layer(x, layer, sin, cos, attend, cfg)
    return x, stats


def layer_is_moe(cfg: ModelConfig) -> tuple[bool, ...]:
    """Per layer, True where its MLP is a mixture of experts (`config.moe_layer`)."""
    return tuple(moe_layer(cfg, i) for i in range(cfg.n_layers))


def layer_runs(cfg: ModelConfig) -> list[tuple[bool, int, int]]:
    """The layers as maximal runs (is_moe, start, end) of one MLP kind, in order."""
    runs: list[tuple[bool, int, int]] = []
    for i, is_moe in enumerate(layer_is_moe(cfg)):
        if runs and runs[-1][0] == is_moe:
            runs[-1] = (is_moe, runs[-1][1], i + 1)
        else:
            runs.append((is_moe, i, i + 1))
    return runs


def run_stacks(params: Params, cfg: ModelConfig) -> list[tuple[int, int, Params]]:
    """(start, end, per-layer stacks [end - start, ...]) for each of `layer_runs`: the
    `layers` slice, with the run's MLP weights merged in (dense) or under "moe"."""
    L = cfg.n_layers
    if cfg.moe_experts <= 0:
        return [(0, L, params["layers"])]
    taken = {False: 0, True: 0}
    out = []
    for is_moe, start, end in layer_runs(cfg):
        first, n = taken[is_moe], end - start
        taken[is_moe] += n
        stack = dict(_rows(params["layers"], start, end))
        mlp_stack = params["moe" if is_moe else "dense_mlp"]
        mlp_rows = _rows(mlp_stack, first, first + n)
        if is_moe:
            stack["moe"] = mlp_rows
        else:
            stack.update(mlp_rows)
        out.append((start, end, stack))
    return out


def _rows(tree: Params, start: int, end: int) -> Params:
    """Rows start:end of every stacked leaf; the tree itself when that is all of them."""
    if (start, end) == (0, jax.tree.leaves(tree)[0].shape[0]):
        return tree
    return jax.tree.map(lambda a: a[start:end], tree)


def scan_layers(step: Callable, x, xs, cfg: ModelConfig, *, scan: bool = True, layers=None):
    """Runs `step(x, xs_i, local) -> (x, y_i)` over the layers `layers` (a range; default
    all), `local` a Python bool from `layer_is_local`; xs: arrays with a leading axis of
    those layers. Returns (x, ys stacked).

    Under a scan a layer's kind is known only at run time: when the model mixes local and
    global layers, `lax.cond` picks the branch traced for each kind.
    """
    kinds = layer_is_local(cfg)[slice(None) if layers is None else slice(layers.start, layers.stop)]
    if not scan:
        ys = []
        for i, local in enumerate(kinds):
            x, y = step(x, jax.tree.map(lambda a, i=i: a[i], xs), local)
            ys.append(y)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)
    if len(set(kinds)) == 1:
        return jax.lax.scan(lambda x, xs_i: step(x, xs_i, kinds[0]), x, xs)

    def mixed(x, xs_local):
        xs_i, local = xs_local

        def branch(kind: bool):
            return lambda x, xs_i: step(x, xs_i, kind)

        return jax.lax.cond(local, branch(True), branch(False), x, xs_i)

    return jax.lax.scan(mixed, x, (xs, jnp.asarray(kinds)))


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
    """tokens: [batch, seq] int -> [batch, seq, embed] in the compute dtype (times
    sqrt(d_model), rounded to that dtype as Gemma does, with scale_embeddings)."""
    x = jnp.take(params["embed"], tokens, axis=0).astype(cfg.dtype)
    if cfg.scale_embeddings:
        x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
    return constrain(x, ("act_batch", "act_seq", "act_embed"))


def vocab_projection(params: Params, cfg: ModelConfig):
    """The [embed, vocab] matrix from final hidden states to logits (the tied embedding or not)."""
    return params["embed"].T if cfg.tie_embeddings else params["unembed"]


def final_norm(params: Params, x, cfg: ModelConfig):
    """The norm before the vocabulary projection. x: [batch, seq, embed] -> same."""
    return norm(x, params["final_norm"], cfg)


def softcap(logits, cap: float):
    """cap * tanh(logits / cap) when cap > 0 (Gemma 2's soft cap), else logits unchanged."""
    return cap * jnp.tanh(logits / cap) if cap > 0 else logits


def unembed(params: Params, x, cfg: ModelConfig):
    """x: [batch, seq, embed] -> float32 logits [batch, seq, vocab] (final norm and soft cap
    included)."""
    x = final_norm(params, x, cfg)
    w = vocab_projection(params, cfg)
    logits = jnp.einsum("bsd,dv->bsv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    logits = softcap(logits, cfg.final_softcap)
    return constrain(logits, ("act_batch", "act_seq", "act_vocab"))


def hidden_states_and_stats(
    params: Params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None
):
    """The decoder stack before the final norm. tokens: [batch, seq] -> ([batch, seq, embed],
    the MoE layers' stats of `moe.moe_mlp` stacked [moe layers, ...], or None if dense)."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    ropes = {local: rope_tables(positions, cfg, local) for local in set(layer_is_local(cfg))}
    x = embed(params, tokens, cfg)

    def step(x, layer, local: bool):
        def one(x, layer):
            return block(x, layer, *ropes[local], segment_ids, cfg, local)

        return _remat(one, cfg.remat)(x, layer)

    stats = []
    for start, end, stack in run_stacks(params, cfg):
        x, ys = scan_layers(step, x, stack, cfg, scan=cfg.scan_layers, layers=range(start, end))
        if ys is not None:
            stats.append(ys)
    if not stats:
        return x, None
    return x, jax.tree.map(lambda *a: jnp.concatenate(a), *stats)


def hidden_states(params: Params, tokens, cfg: ModelConfig, *, segment_ids=None, positions=None):
    """The decoder stack before the final norm. tokens: [batch, seq] -> [batch, seq, embed]."""
    return hidden_states_and_stats(
        params, tokens, cfg, segment_ids=segment_ids, positions=positions
    )[0]


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
