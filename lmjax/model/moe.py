"""The mixture-of-experts MLP: a router picks top-k SwiGLU experts per token.

Parameters of one MoE layer (the `moe` subtree of `transformer.param_specs`, stacked over the
MoE layers):
  router    [embed, experts]      router_bias [experts] (sigmoid_topk_bias: set, not trained)
  w_gate, w_up [experts, embed, moe_mlp]      w_down [experts, moe_mlp, embed]
  shared_gate, shared_up [embed, shared_mlp]  shared_down [shared_mlp, embed]  (moe_shared_d_mlp)

Two dispatch modes, the same function of the parameters wherever no token is dropped:
  dropless (moe_capacity_factor 0): the token copies are sorted by expert and multiplied in
    one grouped matmul (`grouped_matmul`: `jax.lax.ragged_dot`, or on TPU the megablox
    Pallas kernel, by `moe_matmul`), then unsorted: no sort (the sorted order comes from
    a cumsum), and no scatter of rows in the gradient (`take_rows`);
  capacity (> 0): each expert holds at most `capacity` copies in a fixed [experts, capacity,
    embed] buffer; copies past it (first choices of all tokens first, then second choices, in
    token order) are dropped and counted, and contribute nothing to their token.
Under a mesh each device dispatches its own tokens (`per_device`; capacity is then per
device). With expert parallelism (logical axis `expert` on a mesh axis of size > 1) each
device fills capacity buffers from its own tokens and an all-to-all swaps them between the
expert shards and back; dropless then means a capacity of the device's token count.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lmjax.config import MOE_MATMUL_IMPLS, ConfigError, ModelConfig
from lmjax.parallel import sharding

Params = dict[str, Any]


class Routing(NamedTuple):
    weights: jax.Array  # [tokens, top_k] float32, the combine weight of each chosen expert
    experts: jax.Array  # [tokens, top_k] int32, the chosen experts, best first
    logits: jax.Array  # [tokens, experts] float32 router logits
    probs: jax.Array  # [tokens, experts] float32, each token's router distribution (sums to 1)


def route(x, p: Params, cfg: ModelConfig) -> Routing:
    """x: [tokens, embed], p the layer's `router` [embed, experts] (and `router_bias`
    [experts]) -> the top-k choice of each token, by `cfg.moe_router`:
      softmax_topk(_renorm): softmax over all experts, the k largest (renormalized to sum 1);
      sigmoid_topk_bias (DeepSeek-V3): scores = sigmoid(logits), the k largest of
        scores + router_bias chosen, weighted by their unbiased scores renormalized to sum 1.
    The weights are then times `cfg.moe_routed_scale`. The bias only selects (it is under
    stop_gradient: its gradient is 0, `bias_update` moves it); `probs` is the softmax, or
    the scores normalized over the experts, as the balance loss needs a distribution."""
    logits = jnp.einsum(
        "td,de->te", x, p["router"].astype(x.dtype), preferred_element_type=jnp.float32
    )
    if cfg.moe_router == "sigmoid_topk_bias":
        scores = jax.nn.sigmoid(logits)
        bias = jax.lax.stop_gradient(p["router_bias"].astype(jnp.float32))[None, :]
        _, experts = jax.lax.top_k(scores + bias, cfg.moe_top_k)
        weights = _pick(scores, experts)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
        _, experts = jax.lax.top_k(jax.lax.stop_gradient(probs), cfg.moe_top_k)
        weights = _pick(probs, experts)
    if cfg.moe_router != "softmax_topk":
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * cfg.moe_routed_scale
    return Routing(weights, experts.astype(jnp.int32), logits, probs)


def _pick(values, experts):
    """values [tokens, experts] at experts [tokens, top_k] -> [tokens, top_k], exactly, as a
    one-hot mask summed over the experts rather than a gather (or top_k's own values): their
    gradient scatters through a flat [tokens x top_k] index, whose relayout on TPU (top_k in
    the 128-lane axis) the backend compiles to code spanning several overlays (README,
    "Where that compile's time goes")."""
    onehot = jax.nn.one_hot(experts, values.shape[-1], dtype=jnp.bool_)
    return jnp.sum(jnp.where(onehot, values[:, None, :], 0), axis=-1)


def expert_counts(experts, n_experts: int):
    """experts: [tokens, top_k] int -> [experts] float32, copies routed to each expert."""
    return jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=(0, 1))


def balance_loss(routing: Routing, n_experts: int):
    """Switch/Mixtral load balancing: experts x sum_e (copies_e / tokens) x mean_t p_t(e),
    with p the router's full distribution (`Routing.probs`); equals top_k when routing is
    uniform. Scalar float32."""
    tokens = routing.experts.shape[0]
    frac = expert_counts(routing.experts, n_experts) / tokens
    prob = jnp.mean(routing.probs, axis=0)
    return n_experts * jnp.sum(jax.lax.stop_gradient(frac) * prob)


def bias_update(bias, counts, rate: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: bias [..., experts] += rate x
    sign(mean count - count), counts [..., experts] the copies each expert received in the
    step: an overloaded expert's bias falls, an underloaded one's rises (an even one's stays)."""
    mean = jnp.mean(counts, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean - counts).astype(bias.dtype)


def router_z_loss(logits):
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)**2. Scalar float32."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def capacity(tokens: int, cfg: ModelConfig) -> int:
    """Copies each expert holds in capacity mode: ceil(factor x tokens x top_k / experts)."""
    return max(1, math.ceil(cfg.moe_capacity_factor * tokens * cfg.moe_top_k / cfg.moe_experts))


def _swiglu(h_gate, h_up):
    return jax.nn.silu(h_gate) * h_up


def resolve_matmul(impl: str, backend: str | None = None) -> str:
    """`model.moe_matmul` "auto" -> megablox on TPU, ragged_dot on other backends."""
    if impl != "auto":
        return impl
    return "megablox" if (backend or jax.default_backend()) == "tpu" else "ragged_dot"


# Megablox blocks (rows, contracted, output columns) before clamping: MaxText's Mixtral
# tiling for 2-byte inputs, contracted and output blocks halved for 4-byte ones, so that the
# double-buffered operand and output blocks and the float32 accumulator stay near 10 MiB, under
# the 16 MiB of scoped VMEM a TPU kernel gets by default (v5e, v5p; v6e has 32).
_MEGABLOX_BLOCKS = {2: (512, 1024, 1024), 4: (512, 512, 512)}


def megablox_tiling(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
    """The (tm, tk, tn) blocks of a megablox grouped matmul lhs [m, k] x rhs [groups, k, n]:
    `_MEGABLOX_BLOCKS` for the dtype, each clamped to its dimension rounded up to 128. Every
    block is then a multiple of 128, which the TPU takes in any position (its tiles are 8 or
    16 sublanes by 128 lanes, and the backward kernels swap k and n); the rows are padded to a
    multiple of tm (the kernel needs it; padded rows belong to no group and are not computed),
    and a ragged last k or n block is masked or cut off by the kernel."""
    pm, pk, pn = _MEGABLOX_BLOCKS[jnp.dtype(dtype).itemsize]
    up = lambda x: -(-x // 128) * 128
    return min(pm, up(m)), min(pk, up(k)), min(pn, up(n))


def grouped_matmul(lhs, w, group_sizes, impl: str):
    """lhs: [rows, k] sorted by group, w [groups, k, n] in lhs's dtype, group_sizes [groups]
    int32 summing to rows -> [rows, n] in lhs's dtype, accumulated in float32: row r times
    the matrix of the group that holds it. `impl`: ragged_dot (`jax.lax.ragged_dot`) or
    megablox (the Pallas TPU kernel shipped with jax, its custom VJP running the gmm and tgmm
    kernels; off TPU in Pallas interpret mode)."""
    if impl == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, w, group_sizes, preferred_element_type=jnp.float32)
        return out.astype(lhs.dtype)
    if impl != "megablox":
        raise ValueError(f"unknown model.moe_matmul {impl!r}: use one of {MOE_MATMUL_IMPLS}")
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    (m, k), n = lhs.shape, w.shape[2]
    tiling = megablox_tiling(m, k, n, lhs.dtype)
    padded = jnp.pad(lhs, ((0, -m % tiling[0]), (0, 0)))

    def kernel(interpret, padded, w, group_sizes):
        return megablox.gmm(padded, w, group_sizes, lhs.dtype, tiling=tiling, interpret=interpret)

    # By the platform the program is lowered for, not the one that traces it: `lmjax compile`
    # traces on a CPU for a TPU and must get the Mosaic kernel.
    out = jax.lax.platform_dependent(
        padded,
        w,
        group_sizes,
        tpu=functools.partial(kernel, False),
        default=functools.partial(kernel, True),
    )
    return out[:m]


def grouped_experts(xs, group_sizes, p: Params, impl: str):
    """xs: [copies, embed] sorted by expert, group_sizes [experts] int32 -> [copies, embed]:
    row r through the expert whose group holds it (`grouped_matmul` by `impl`)."""

    def gmm(lhs, w):
        return grouped_matmul(lhs, w.astype(lhs.dtype), group_sizes, impl)

    return gmm(_swiglu(gmm(xs, p["w_gate"]), gmm(xs, p["w_up"])), p["w_down"])


def buffered_experts(buf, p: Params):
    """buf: [experts, capacity, embed] -> same: slot (e, c) through expert e."""

    def mm(lhs, w):
        return jnp.einsum(
            "ecd,edf->ecf", lhs, w.astype(lhs.dtype), preferred_element_type=jnp.float32
        ).astype(lhs.dtype)

    return mm(_swiglu(mm(buf, p["w_gate"]), mm(buf, p["w_up"])), p["w_down"])


@jax.custom_vjp
def take_rows(rows, to, back):
    """rows: [n, d], to [m] int32 -> rows[to] [m, d], where `to` takes every row the same
    number of times, m // n, and back [m] int32 says where those copies went: the j-th copy
    of row r is output row back[j x n + r]. The gradient is then gathered too (row r's is
    the sum of g[back[j x n + r]] over j) instead of scatter-added, as jax's own gather
    gradient would be: on TPU that scatter of [copies, embed] rows compiles slowly."""
    return rows[to]


def _take_rows_fwd(rows, to, back):
    return rows[to], (back, rows.shape[0])


def _take_rows_bwd(residuals, g):
    back, n = residuals
    return g[back].reshape(-1, n, g.shape[-1]).sum(0), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def dropless(x, experts, p: Params, cfg: ModelConfig):
    """x: [tokens, embed], experts [tokens, top_k] -> ([tokens, top_k, embed] each copy's
    expert output, dropped copies = 0)."""
    tokens, k = experts.shape
    # Copies choice-major (copy j x tokens + t is token t's choice j): flattening [tokens,
    # top_k] token-major is, on TPU, a relayout that compiles to far more code (README).
    flat = experts.T.reshape(-1)
    group_sizes = jnp.bincount(flat, length=cfg.moe_experts).astype(jnp.int32)
    # Each copy's row in the expert-sorted order (its expert's first row plus the copies of
    # that expert before it), and the copy at each sorted row: a cumsum and a scatter of
    # ints, which compile for TPU in a fraction of an argsort's time.
    slot, _ = slots(experts, cfg.moe_experts, tokens)
    pos = (jnp.cumsum(group_sizes) - group_sizes)[flat] + slot.T.reshape(-1)
    copy = jnp.arange(flat.shape[0], dtype=jnp.int32)
    order = jnp.zeros_like(copy).at[pos].set(copy, unique_indices=True)
    ys = grouped_experts(
        take_rows(x, order % tokens, pos), group_sizes, p, resolve_matmul(cfg.moe_matmul)
    )
    # Unsorted by a scatter (its gradient a gather): as a gather, ys[pos], the TPU program
    # compiled faster but held more (qwen3_30b_a3b's step +2.37 GiB per chip, README).
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)
    return jnp.swapaxes(y.reshape(k, tokens, -1), 0, 1), jnp.zeros((), jnp.float32)


def slots(experts, n_experts: int, cap: int):
    """experts: [tokens, top_k] -> (slot [tokens, top_k] int32, each copy's place in its
    expert's buffer in priority order (all first choices in token order, then all second
    choices, ...), kept [tokens, top_k] bool: slot < cap)."""
    onehot = jax.nn.one_hot(experts.T, n_experts, dtype=jnp.int32)  # [k, tokens, experts]
    ahead = jnp.cumsum(onehot.reshape(-1, n_experts), axis=0).reshape(onehot.shape) - onehot
    slot = jnp.sum(ahead * onehot, axis=-1).T
    return slot, slot < cap


def dispatch(x, experts, slot, n_experts: int, cap: int):
    """x: [tokens, embed] -> the [experts, cap, embed] buffer holding each kept copy at
    (its expert, its slot); empty slots are 0."""
    k = experts.shape[1]
    buf = jnp.zeros((n_experts, cap, x.shape[-1]), x.dtype)
    src = jnp.repeat(x, k, axis=0)
    return buf.at[experts.reshape(-1), slot.reshape(-1)].set(src, mode="drop")


def collect(buf, experts, slot):
    """buf: [experts, cap, embed] -> [tokens, top_k, embed], each copy's row (0 if dropped)."""
    tokens, k = experts.shape
    rows = buf.at[experts.reshape(-1), slot.reshape(-1)].get(mode="fill", fill_value=0)
    return rows.reshape(tokens, k, -1)


def with_capacity(x, experts, p: Params, cfg: ModelConfig):
    """Capacity-mode twin of `dropless`: (copies' outputs [tokens, top_k, embed], number of
    dropped copies, float32)."""
    E, cap = cfg.moe_experts, capacity(x.shape[0], cfg)
    slot, kept = slots(experts, E, cap)
    out = collect(buffered_experts(dispatch(x, experts, slot, E, cap), p), experts, slot)
    return out, jnp.sum(~kept).astype(jnp.float32)


def per_device(x, experts, p: Params, cfg: ModelConfig):
    """x: [batch, seq, embed], experts [batch, seq, top_k] -> (copies' outputs [batch, seq,
    top_k, embed], dropped copies): each device dispatches its own rows (under a mesh; the
    whole batch without one), so that no sort or buffer spans the global batch.

    Without an expert axis a device runs every expert on its rows (`dropless` or
    `with_capacity`, the weights gathered as FSDP gathers them). With one (`expert` on a
    mesh axis of size > 1) it fills an [experts, capacity, embed] buffer (capacity: the
    configured one, or its token count when dropless, which no expert can exceed as a
    token's k experts differ), sends each expert shard its block by all-to-all, runs its
    local experts on what it received from every device and sends the results back the same
    way. Dropless, the result equals one device's; with capacity, each device's tokens
    compete for their own share of it.
    """
    E = cfg.moe_experts

    def local(x, experts, w_gate, w_up, w_down):
        b, s, d = x.shape
        tokens, flat = b * s, experts.reshape(b * s, -1)
        w = {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}
        if not sharding.active_mesh_axes("expert"):
            run = with_capacity if cfg.moe_capacity_factor > 0 else dropless
            out, dropped = run(x.reshape(tokens, d), flat, w, cfg)
            return out.reshape(b, s, -1, d), dropped[None]
        cap = capacity(tokens, cfg) if cfg.moe_capacity_factor > 0 else tokens
        slot, kept = slots(flat, E, cap)
        buf = dispatch(x.reshape(tokens, d), flat, slot, E, cap)
        buf = sharding.all_to_all_logical(buf, "expert", 0, 1)  # [local experts, devices x cap, d]
        buf = buffered_experts(buf, w)
        buf = sharding.all_to_all_logical(buf, "expert", 1, 0)
        out = collect(buf, flat, slot).reshape(b, s, -1, d)
        return out, jnp.sum(~kept).astype(jnp.float32)[None]

    rows = ("act_batch", "act_seq", None)
    weight = ("expert", None, None)
    fn = sharding.shard_map_logical(
        local,
        in_axes=(rows, rows, weight, weight, weight),
        out_axes=(("act_batch", "act_seq", None, None), ("act_batch",)),
    )
    # Cast before the shard_map: the weights are gathered into it in the compute dtype.
    weights = [p[k].astype(x.dtype) for k in ("w_gate", "w_up", "w_down")]
    if not sharding.splits_evenly(x.shape, rows):
        if sharding.active_mesh_axes("expert"):
            raise ConfigError(
                f"an MoE batch of {x.shape[0]} rows x {x.shape[1]} positions does not split "
                "evenly over the mesh's act_batch/act_seq axes, which expert parallelism "
                "needs: give a batch divisible by the data x fsdp x expert devices"
            )
        # A generation or evaluation batch smaller than the devices (3 prompts on 8 chips):
        # one dispatch over the whole batch, which XLA partitions as it can.
        out, dropped = local(x, experts, *weights)
        return out, jnp.sum(dropped)
    out, dropped = fn(x, experts, *weights)
    return out, jnp.sum(dropped)


def shared_expert(x, p: Params):
    """x: [tokens, embed] -> [tokens, embed] through the always-on shared SwiGLU expert."""

    def mm(lhs, w):
        return jnp.einsum("td,df->tf", lhs, w.astype(lhs.dtype))

    return mm(_swiglu(mm(x, p["shared_gate"]), mm(x, p["shared_up"])), p["shared_down"])


def moe_mlp(x, p: Params, cfg: ModelConfig):
    """x: [batch, seq, embed] -> (y like x, stats) with stats float32: counts [experts]
    (copies each expert received), prob_sum [experts] (the router distributions summed over
    tokens), copies (tokens x top_k), dropped (copies dropped),
    balance and z (`balance_loss`, `router_z_loss`)."""
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    r = route(flat, p, cfg)
    copies, dropped = per_device(x, r.experts.reshape(b, s, -1), p, cfg)
    copies = copies.reshape(b * s, -1, d)
    y = jnp.einsum("tk,tkd->td", r.weights.astype(copies.dtype), copies)
    if cfg.moe_shared_d_mlp > 0:
        y = y + shared_expert(flat, p)
    stats = {
        "counts": expert_counts(r.experts, cfg.moe_experts),
        "prob_sum": jnp.sum(r.probs, axis=0),
        "dropped": dropped,
        "copies": jnp.float32(r.experts.size),
        "balance": balance_loss(r, cfg.moe_experts),
        "z": router_z_loss(r.logits),
    }
    return y.reshape(b, s, d), stats
