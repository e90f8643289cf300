"""Model numerics in float32 against the independent numpy reference (tests/numpy_llama.py).

Parameters are drawn as a random HF-named state dict and placed into the lmjax layout by
`tests.helpers.params_from_hf`, a direct transcription of the layouts documented in
lmjax/model/transformer.py (deliberately not lmjax.convert.hf, which tests/unit/test_convert.py
checks on its own).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax.model import transformer
from tests.helpers import random_model
from tests.unit.test_model import CFG, SCALED, packed_batch, tokens_for


def loss_fn(params, tokens, cfg):
    logits = transformer.forward(params, tokens[:, :-1], cfg)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def test_packed_row_equals_each_document_alone():
    params, _ = random_model(SCALED, seed=7)
    tokens, seg, pos, lengths = packed_batch()
    packed = np.asarray(
        transformer.forward(
            params,
            jnp.asarray(tokens),
            SCALED,
            segment_ids=jnp.asarray(seg),
            positions=jnp.asarray(pos),
        )
    )
    for row in range(2):
        start = 0
        for n in lengths[row]:
            alone = transformer.forward(
                params, jnp.asarray(tokens[row : row + 1, start : start + n]), SCALED
            )
            np.testing.assert_allclose(
                packed[row, start : start + n], np.asarray(alone)[0], atol=2e-5, rtol=0
            )
            start += n


def _grads(cfg, params, tokens):
    return jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)(params, jnp.asarray(tokens), cfg)


def test_remat_policies_layer_scan_and_row_major_matmuls_give_the_same_gradients():
    params, _ = random_model(CFG, seed=11)
    tokens = tokens_for(12, seq=33)
    ref_loss, ref_grads = _grads(CFG, params, tokens)
    assert float(optax.tree.norm(ref_grads)) > 1e-3
    variants = [dataclasses.replace(CFG, remat=p) for p in ("full", "save_dots", "save_attn")]
    variants.append(dataclasses.replace(CFG, scan_layers=False, remat="save_attn"))
    variants += [
        dataclasses.replace(CFG, matmul="row_major", remat=p) for p in ("none", "save_dots")
    ]
    for cfg in variants:
        loss, grads = _grads(cfg, params, tokens)
        assert float(loss) == pytest.approx(float(ref_loss), abs=1e-6), cfg
        for (path, g), r in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)
        ):
            np.testing.assert_allclose(
                np.asarray(g),
                np.asarray(r),
                atol=1e-6,
                rtol=1e-5,
                err_msg=f"remat={cfg.remat} scan={cfg.scan_layers} matmul={cfg.matmul} "
                f"{jax.tree_util.keystr(path)}",
            )


def test_bfloat16_compute_stays_close_to_float32():
    params, _ = random_model(CFG, seed=15)
    tokens = jnp.asarray(tokens_for(16))
    f32 = np.asarray(transformer.forward(params, tokens, CFG))
    bf16_logits = transformer.forward(params, tokens, dataclasses.replace(CFG, dtype="bfloat16"))
    assert bf16_logits.dtype == jnp.float32  # logits are accumulated in float32
    bf16 = np.asarray(bf16_logits)
    rel = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert 0 < rel < 2e-2, rel
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9
