"""The training objective of one batch, shared by the train step and the evaluator."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax.batch import Batch
from lmjax.config import ModelConfig
from lmjax.model import cross_entropy, matmul, transformer


def loss_terms(
    params,
    batch: Batch,
    model_cfg: ModelConfig,
    z_loss: float,
    moe_aux_loss: float = 0.0,
    moe_router_z_loss: float = 0.0,
    balance_weights=None,
):
    """Summed (not averaged) objective terms of one (micro)batch of [batch, seq] arrays.

    Returns (objective_sum, aux) with aux = {nll_sum, z_sum, tokens}, float32 scalars;
    dividing by the token count of the whole step gives the mean, so microbatches add up to
    the big batch. A mixture-of-experts model adds its balance and router z-losses (means
    over the microbatch's tokens, summed over layers) times the microbatch's loss tokens,
    weighted by `moe_aux_loss` and `moe_router_z_loss`, and aux gains their sums and the
    per-layer `moe_counts` [moe layers, experts], `moe_dropped` and `moe_copies` [moe
    layers] (`moe_aux`). `balance_weights` [moe layers, experts] replaces the microbatch's
    balance loss by its share of the whole step's (`step_balance_weights`).
    """
    x, stats = transformer.hidden_states_and_stats(
        params,
        batch["inputs"],
        model_cfg,
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    x = transformer.final_norm(params, x, model_cfg)
    mask = batch["loss_mask"].astype(jnp.float32)
    with jax.named_scope("loss"):
        objective, nll_sum, z_sum = cross_entropy.loss_sums(
            x,
            transformer.vocab_projection(params, model_cfg),
            batch["targets"],
            mask,
            z_loss=z_loss,
            softcap=model_cfg.final_softcap,
            chunk=model_cfg.logits_chunk,
            impl=matmul.resolve_impl(model_cfg.matmul, model_cfg.dtype),
        )
    aux = {"nll_sum": nll_sum, "z_sum": z_sum, "tokens": jnp.sum(mask)}
    if stats is not None:
        moe = moe_aux(stats, aux["tokens"], balance_weights)
        objective += moe_aux_loss * moe["moe_balance_sum"] + moe_router_z_loss * moe["moe_z_sum"]
        aux.update(jax.lax.stop_gradient(moe))
    return objective, aux


def moe_aux(stats, tokens, balance_weights=None):
    """The MoE layers' stats (`moe.moe_mlp`, stacked over layers) as sums that add up over
    microbatches: the balance and z-losses averaged over the MoE layers (the scale of Hugging
    Face's `router_aux_loss_coef`, which scores all layers' routing at once) times the
    microbatch's `tokens`; each expert's copies and summed router probability, all copies
    (token x top_k routed) and dropped copies as counted. With `balance_weights` w the
    balance sum is instead the mean over layers of sum_e w_e x the microbatch's summed router
    probability of e."""
    balance = jnp.mean(stats["balance"]) * tokens
    if balance_weights is not None:
        balance = jnp.mean(jnp.sum(balance_weights * stats["prob_sum"], axis=-1))
    return {
        "moe_balance_sum": balance,
        "moe_z_sum": jnp.mean(stats["z"]) * tokens,
        "moe_counts": stats["counts"],
        "moe_prob_sum": stats["prob_sum"],
        "moe_dropped": stats["dropped"],
        "moe_copies": stats["copies"],
    }


def step_balance_weights(counts, tokens, top_k: int):
    """counts [moe layers, experts], each expert's copies over a step's microbatches, and
    tokens, the step's loss tokens -> the `balance_weights` w = experts x tokens x counts /
    routed**2 (routed: the tokens routed) that make the microbatches' balance sums add up to
    tokens x the step's balance loss (`moe.balance_loss` of its batch at once: summed over
    microbatches, sum_e w_e x prob_sum_e = tokens x experts x sum_e frac_e x mean prob_e). The
    fractions are constants of the gradient, as in `moe.balance_loss`."""
    routed = jnp.sum(counts, axis=-1, keepdims=True) / top_k
    return jax.lax.stop_gradient(counts.shape[-1] * tokens * counts / routed**2)
