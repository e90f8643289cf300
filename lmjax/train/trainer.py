"""The train state, the jitted train step, and what runs it on a mesh: `make_trainer`
compiles init and step for a (config, mesh) and `evaluate_params` runs the evaluator on the
trainer's mesh (host rows become global arrays in `lmjax.parallel.host_rows`). The run around
them (resume, data, hooks) is `lmjax.train.run`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax.batch import Batch
from lmjax.config import Config, ModelConfig, OptimConfig
from lmjax.inference import evaluate
from lmjax.model import moe, transformer
from lmjax.model.objective import loss_terms, step_balance_weights
from lmjax.parallel import host_rows, sharding
from lmjax.train import optim


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]; folded with the step wherever randomness is needed


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state; jit it with out_shardings to create it already sharded."""
    rng = jax.random.PRNGKey(seed)
    params = transformer.init(model_cfg, jax.random.fold_in(rng, 0))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng
    )


def state_axes(model_cfg: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    """Logical axes of every state leaf: optimizer moments follow their parameter, the
    other optimizer leaves (counts) are replicated."""
    params_axes = transformer.param_axes(model_cfg)
    shapes = jax.eval_shape(functools.partial(init_state, model_cfg, tx, 0))
    # Any: mypy cannot resolve jax's PyTreeDef, whose == is a tree-structure comparison.
    params_def: Any = jax.tree.structure(shapes.params)
    is_params = lambda x: params_def == jax.tree.structure(x)
    opt_axes = jax.tree.map(
        lambda x: params_axes if is_params(x) else (None,) * x.ndim,
        shapes.opt_state,
        is_leaf=is_params,
    )
    # The state's own tree, each leaf replaced by its logical axes.
    return shapes.replace(step=(), params=params_axes, opt_state=opt_axes, rng=(None,))


# ---------------------------------------------------------------- the step


def microbatches(x: jax.Array, n: int) -> jax.Array:
    """[batch, ...] -> [n, batch / n, ...], microbatch m = rows m, m + n, m + 2n, ...

    Strided, so that each microbatch takes rows from every batch shard: a device's
    contiguous block of rows holds its share of all n microbatches (when n divides the rows
    per shard) and no microbatch moves between devices.
    """
    micro = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(micro, (None, "act_batch") + (None,) * (x.ndim - 1))


def summed_grads(params, batch: Batch, model_cfg: ModelConfig, optim_cfg: OptimConfig):
    """(gradients of the summed NLL (+ z-loss), {"nll_sum", "z_sum", "tokens"}) over
    `optim_cfg.grad_accum` microbatches of `batch` (arrays [batch, seq]), summed, not averaged:
    the caller divides by the step's token count."""
    grad_fn = functools.partial(
        jax.grad(loss_terms, has_aux=True),
        model_cfg=model_cfg,
        z_loss=optim_cfg.z_loss,
        moe_aux_loss=optim_cfg.moe_aux_loss,
        moe_router_z_loss=optim_cfg.moe_router_z_loss,
    )
    n_micro = optim_cfg.grad_accum
    if n_micro == 1:
        return grad_fn(params, batch)
    micro = jax.tree.map(lambda x: microbatches(x, n_micro), batch)
    if optim_cfg.moe_balance_over_step and optim_cfg.moe_aux_loss and model_cfg.moe_experts:
        counts = step_expert_counts(params, micro, model_cfg)
        tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        weights = step_balance_weights(counts, tokens, model_cfg.moe_top_k)
        grad_fn = functools.partial(grad_fn, balance_weights=weights)
    params_axes = transformer.param_axes(model_cfg)
    like_params = lambda tree: jax.tree.map(
        sharding.constrain,
        tree,
        params_axes,
        is_leaf=sharding.is_axes,
    )

    def accumulate(carry, mb):
        g, a = grad_fn(params, mb)
        g, a = jax.tree.map(jnp.add, carry, (g, a))
        return (like_params(g), a), None

    zeros = like_params(jax.tree.map(jnp.zeros_like, params))
    first = jax.tree.map(lambda x: x[0], micro)
    zero_aux = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, first)[1])
    (grads, aux), _ = jax.lax.scan(accumulate, (zeros, zero_aux), micro)
    return grads, aux


def step_expert_counts(params, micro: Batch, model_cfg: ModelConfig):
    """[moe layers, experts] each expert's copies over all microbatches `micro` ([n, rows,
    seq] arrays): a forward pass over them, without gradients."""

    def count(total, mb):
        _, stats = transformer.hidden_states_and_stats(
            params,
            mb["inputs"],
            model_cfg,
            segment_ids=mb["segment_ids"],
            positions=mb["positions"],
        )
        return total + stats["counts"], None

    n_moe = sum(transformer.layer_is_moe(model_cfg))
    zeros = jnp.zeros((n_moe, model_cfg.moe_experts), jnp.float32)
    return jax.lax.stop_gradient(jax.lax.scan(count, zeros, micro)[0])


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model_cfg: ModelConfig,
    optim_cfg: OptimConfig,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    skip_nonfinite: bool,
):
    """One optimizer update over `optim_cfg.grad_accum` microbatches. Pure.

    batch: arrays [batch, seq]. Returns (new_state, metrics of this step).
    """
    grads, aux = summed_grads(state.params, batch, model_cfg, optim_cfg)
    tokens = jnp.maximum(aux["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    loss = aux["nll_sum"] / tokens
    grad_norm = optax.tree.norm(grads)
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    if optim_cfg.moe_bias_rate > 0:
        params = _with_bias_update(params, state.params, aux["moe_counts"], optim_cfg)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if skip_nonfinite:
        new_state = _unless_finite(finite, new_state, state)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": schedule(state.step),
        "tokens": aux["tokens"],
        "finite": finite,
    }
    if optim_cfg.z_loss:
        metrics["z_loss"] = aux["z_sum"] / tokens
    if "moe_counts" in aux:
        metrics.update(moe_metrics(aux, tokens, model_cfg))
    return new_state, metrics


def moe_metrics(aux: dict, tokens, model_cfg: ModelConfig) -> dict:
    """Scalars of a mixture-of-experts step from its summed aux (`objective.moe_aux`):
    moe_balance and moe_router_z (token means of the objective's terms, averaged over
    layers), moe_balance_batch (the balance loss of the whole step's batch at once, which
    the objective's per-microbatch one equals without accumulation), and for each MoE layer
    (its index i among all layers) moe_load_max/i, the busiest expert's share of the copies
    times the experts (1: even), and in capacity mode moe_dropped/i, the fraction of its
    copies dropped."""
    copies = aux["moe_copies"][:, None]  # [moe layers, 1]
    load = aux["moe_counts"] / copies  # [moe layers, experts], rows sum to 1
    routed = copies / model_cfg.moe_top_k  # tokens routed per layer
    balance = model_cfg.moe_experts * jnp.sum(
        (aux["moe_counts"] / routed) * (aux["moe_prob_sum"] / routed), axis=-1
    )
    out = {
        "moe_balance": aux["moe_balance_sum"] / tokens,
        "moe_balance_batch": jnp.mean(balance),
        "moe_router_z": aux["moe_z_sum"] / tokens,
    }
    layers = [i for i, is_moe in enumerate(transformer.layer_is_moe(model_cfg)) if is_moe]
    for row, i in enumerate(layers):
        out[f"moe_load_max/{i}"] = jnp.max(load[row]) * model_cfg.moe_experts
        if model_cfg.moe_capacity_factor > 0:
            out[f"moe_dropped/{i}"] = aux["moe_dropped"][row] / aux["moe_copies"][row]
    return out


def _with_bias_update(params, old, counts, optim_cfg: OptimConfig):
    """`params` with each MoE layer's router_bias set from its value before the step by
    `moe.bias_update`, from counts [moe layers, experts], the copies each expert received over
    the whole step (all microbatches, all devices). Its gradient is 0 (it only selects), so the
    optimizer moved it by nothing; setting it from the old value keeps that so whatever the
    optimizer."""
    old_bias = old["moe"]["router_bias"]
    new_bias = moe.bias_update(old_bias, counts, optim_cfg.moe_bias_rate)
    return {**params, "moe": {**params["moe"], "router_bias": new_bias}}


def _unless_finite(finite: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """`new`, except that a non-finite step keeps the old params and moments. The optimizer's
    integer leaves (its step counts, which drive the schedule) advance with `step` either way,
    so the learning rate applied after a skip is still schedule(step), the one logged."""

    def keep_old(n, o):
        return jnp.where(finite, n, o) if jnp.issubdtype(n.dtype, jnp.inexact) else n

    return new.replace(
        params=jax.tree.map(keep_old, new.params, old.params),
        opt_state=jax.tree.map(keep_old, new.opt_state, old.opt_state),
    )


# ---------------------------------------------------------------- compiled pieces


@dataclasses.dataclass
class Trainer:
    """Everything compiled for one (config, mesh): shardings, init and step functions."""

    config: Config
    mesh: Mesh
    rules: dict
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init_fn: Any
    step_fn: Any


def make_trainer(config: Config, mesh: Mesh) -> Trainer:
    """Builds shardings from the logical rules and jits init and step with them."""
    rules = sharding.rules_from_config(config.mesh)
    tx = optim.make_optimizer(config.optim, config.run.steps)
    schedule = optim.learning_rate_schedule(config.optim, config.run.steps)
    shapes = jax.eval_shape(functools.partial(init_state, config.model, tx, config.run.seed))
    axes = state_axes(config.model, tx)
    state_shardings = sharding.tree_shardings(axes, mesh, rules, shapes)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    init_fn = jax.jit(
        functools.partial(init_state, config.model, tx, config.run.seed),
        out_shardings=state_shardings,
    )
    step = functools.partial(
        train_step,
        model_cfg=config.model,
        optim_cfg=config.optim,
        tx=tx,
        schedule=schedule,
        skip_nonfinite=config.checkpoint.on_nonfinite == "skip",
    )

    def step_with_rules(state, batch):
        with sharding.activation_sharding(mesh, rules):
            return step(state, batch)

    replicated = NamedSharding(mesh, P())
    step_fn = jax.jit(
        step_with_rules,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    return Trainer(
        config, mesh, rules, tx, schedule, state_shardings, batch_sharding, init_fn, step_fn
    )


def evaluate_params(
    trainer: Trainer,
    params,
    sets: dict[str, list[dict]],
    weights: dict[str, float] | None = None,
) -> dict[str, float]:
    """The evaluator (`evaluate.eval_sums`) on process-local rows of each source, on the
    trainer's mesh: eval_loss, eval_perplexity and eval_tokens (scored targets) of all sources
    together, so eval_loss is token-weighted; with several sources also eval_loss/SOURCE and
    eval_tokens/SOURCE of each and eval_loss_weighted, the mean of the sources' losses under
    `weights` (their mixture weights; default equal)."""
    place = functools.partial(host_rows.global_batch, batch_sharding=trainer.batch_sharding)
    with sharding.activation_sharding(trainer.mesh, trainer.rules):
        sums = {
            name: evaluate.eval_sums(params, trainer.config.model, batches, place=place)
            for name, batches in sets.items()
        }
    total = evaluate.summarize(sum(n for n, _ in sums.values()), sum(t for _, t in sums.values()))
    result = {f"eval_{k}": v for k, v in total.items()}
    if len(sums) > 1:
        each = {name: evaluate.summarize(*s) for name, s in sums.items()}
        weights = weights or {name: 1.0 for name in sums}
        for name, r in each.items():
            result.update({f"eval_loss/{name}": r["loss"], f"eval_tokens/{name}": r["tokens"]})
        result["eval_loss_weighted"] = sum(weights[n] * each[n]["loss"] for n in each) / sum(
            weights[n] for n in each
        )
    return result
