"""The training objective of one batch, shared by the train step and the evaluator."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmjax.batch import Batch
from lmjax.config import ModelConfig
from lmjax.model import cross_entropy, matmul, transformer


def loss_terms(params, batch: Batch, model_cfg: ModelConfig, z_loss: float):
    """Summed (not averaged) objective terms of one (micro)batch of [batch, seq] arrays.

    Returns (objective_sum, aux) with aux = {nll_sum, z_sum, tokens}, float32 scalars;
    dividing by the token count of the whole step gives the mean, so microbatches add up to
    the big batch.
    """
    x = transformer.hidden_states(
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
    return objective, {"nll_sum": nll_sum, "z_sum": z_sum, "tokens": jnp.sum(mask)}
