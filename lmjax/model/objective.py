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
):
    """Summed (not averaged) objective terms of one (micro)batch of [batch, seq] arrays.

    Returns (objective_sum, aux) with aux = {nll_sum, z_sum, tokens}, float32 scalars;
    dividing by the token count of the whole step gives the mean, so microbatches add up to
    the big batch. A mixture-of-experts model adds its balance and router z-losses (means
    over the microbatch's tokens, summed over layers) times the microbatch's loss tokens,
    weighted by `moe_aux_loss` and `moe_router_z_loss`, and aux gains their sums and the
    per-layer `moe_counts` [moe layers, experts], `moe_dropped` and `moe_copies` [moe
    layers] (`moe_aux`).
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
        moe = moe_aux(stats, aux["tokens"])
        objective += moe_aux_loss * moe["moe_balance_sum"] + moe_router_z_loss * moe["moe_z_sum"]
        aux.update(jax.lax.stop_gradient(moe))
    return objective, aux


def moe_aux(stats, tokens):
    """The MoE layers' stats (`moe.moe_mlp`, stacked over layers) as sums that add up over
    microbatches: the balance and z-losses averaged over the MoE layers (the scale of Hugging
    Face's `router_aux_loss_coef`, which scores all layers' routing at once) times the
    microbatch's `tokens`; each expert's copies and summed router probability, all copies
    (token x top_k routed) and dropped copies as counted."""
    return {
        "moe_balance_sum": jnp.mean(stats["balance"]) * tokens,
        "moe_z_sum": jnp.mean(stats["z"]) * tokens,
        "moe_counts": stats["counts"],
        "moe_prob_sum": stats["prob_sum"],
        "moe_dropped": stats["dropped"],
        "moe_copies": stats["copies"],
    }
