"""Ahead-of-time TPU compiles with libtpu's compile-only devices, and the chunked loss that
keeps full logits out of memory."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import cli, hardware
from lmjax.batch import BATCH_KEYS
from lmjax.commands.experiment import load_experiment
from lmjax.config import ModelConfig
from lmjax.model import flops, transformer
from lmjax.model.objective import loss_terms
from lmjax.tools import aot
from lmjax.train import optim, trainer
from tests import tpu_compiler


def test_smoke_compiles_for_v5e_with_splash_and_sharded_state():
    tpu_compiler.require()
    config = load_experiment("smoke", ["data.seq_len=128"])
    report = aot.compile_train_step(config, hardware.parse_target("v5litepod-4"))
    assert report.mesh_shape == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    assert report.pallas_calls > 0  # attention="auto" became the splash kernel
    # Arguments hold a quarter of the state and of the batch (fsdp=4 divides every sharded
    # dimension of smoke), padded to TPU tiles: at least the exact quarter, and less than
    # one whole copy of the state.
    state = jax.eval_shape(
        functools.partial(
            trainer.init_state, config.model, optim.make_optimizer(config.optim, 20), 0
        )
    )
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    batch_bytes = len(BATCH_KEYS) * 8 * 128 * 4
    assert report.argument_bytes >= (state_bytes + batch_bytes) / 4
    assert report.argument_bytes < state_bytes
    assert report.alias_bytes > 0.9 * report.output_bytes  # donated state is updated in place
    assert 0 < report.total_bytes < 64 * 1024**2 and report.fits
    assert report.model_flops == pytest.approx(
        flops.flops_per_token(config.model, 128) * 8 * 128 / 4
    )
    assert report.compile_seconds > 0


def test_cli_compile_multislice_moe_prints_the_report_with_the_megablox_kernels(capsys):
    """smoke with its 2 layers MoE (4 experts, dropless, model.moe_matmul auto) on
    2 slices: the compiled TPU program holds megablox's kernels. Per layer (XLA unrolls the
    2-layer scan, or keeps one body), gmm runs the 3 expert matmuls forward, again in the
    backward's full remat and for their input gradients (9), and tgmm their weight
    gradients (3)."""
    tpu_compiler.require()
    code = cli.main(
        [
            "compile",
            "--experiment",
            "smoke",
            "--topology",
            "v5e:2x2",
            "--num-slices",
            "2",
            "--set",
            "data.seq_len=128",
            "--set",
            "mesh.dcn_data=2",
            "--set",
            "model.moe_experts=4",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert (
        "v5e-4 (v5e:2x2 x 2 slices), 8 chips, mesh {'data': 2, 'fsdp': 4, 'expert': 1, 'tensor': 1}"
        in out
    )
    gmm, tgmm = (int(re.search(rf", {name} (\d+)", out).group(1)) for name in ("gmm", "tgmm"))
    assert tgmm in (3, 6) and gmm == 3 * tgmm, out
    assert "of 16 GiB HBM" in out and out.rstrip().endswith("fits")


def test_cli_compile_fails_when_the_step_does_not_fit(capsys):
    tpu_compiler.require()
    # 2 x 4M x 1024 float32 params + Adam moments = 96 GiB, 24 GiB per chip > 16 GiB.
    code = cli.main(
        [
            "compile",
            "--experiment",
            "smoke",
            "--topology",
            "v5e-4",
            "--set",
            "data.seq_len=128",
            "--set",
            "model.vocab_size=4194304",
            "--set",
            "model.d_model=1024",
            "--set",
            "model.n_layers=1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "DOES NOT FIT" in out


def test_cli_compile_rejects_a_batch_the_mesh_does_not_divide(capsys):
    tpu_compiler.require()
    code = cli.main(
        ["compile", "--experiment", "smoke", "--topology", "v5e-16", "--set", "data.seq_len=128"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "'act_batch' of size 8" in err and "of size 16" in err


CHUNKED = ModelConfig(
    vocab_size=1024,
    d_model=32,
    n_layers=1,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    d_mlp=64,
    max_seq_len=128,
    dtype="float32",
    attention="xla",
    logits_chunk=16,
)


def _batch(rows, seq, vocab):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (rows, seq + 1))
    segments = np.sort(rng.integers(0, 3, (rows, seq)), axis=1)
    positions = np.concatenate([np.arange(seq)[None]] * rows)
    mask = (rng.random((rows, seq)) > 0.1).astype(np.float32)
    return {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(positions),
        "loss_mask": jnp.asarray(mask),
    }


def test_chunked_loss_matches_the_full_projection_and_its_gradients():
    full = dataclasses.replace(CHUNKED, logits_chunk=0)
    params = transformer.init(full, jax.random.PRNGKey(1))
    batch = _batch(3, 64, full.vocab_size)

    def value_and_grad(cfg):
        return jax.jit(jax.value_and_grad(loss_terms, has_aux=True), static_argnums=(2, 3))(
            params, batch, cfg, 1e-3
        )

    (obj_full, aux_full), g_full = value_and_grad(full)
    (obj_chunk, aux_chunk), g_chunk = value_and_grad(CHUNKED)
    # an independent reference: numpy logsumexp over explicit logits
    logits = np.asarray(
        transformer.forward(
            params,
            batch["inputs"],
            full,
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
        ),
        np.float64,
    )
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    nll = np.sum((logz - target) * np.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(float(aux_chunk["nll_sum"]), nll, rtol=1e-6)
    np.testing.assert_allclose(float(obj_chunk), float(obj_full), rtol=1e-6)
    np.testing.assert_allclose(float(aux_chunk["z_sum"]), float(aux_full["z_sum"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_full)):
        # summation order differs (chunks accumulate the unembed gradient): float32 rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_chunked_loss_never_holds_the_full_logits():
    batch = _batch(4, 128, CHUNKED.vocab_size)
    params = jax.eval_shape(lambda: transformer.init(CHUNKED, jax.random.PRNGKey(0)))
    logits_bytes = 4 * 128 * CHUNKED.vocab_size * 4  # 2 MiB of float32 logits

    def temp_bytes(cfg):
        grad = jax.jit(jax.grad(lambda p, b: loss_terms(p, b, cfg, 0.0)[0]))
        return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    full = temp_bytes(dataclasses.replace(CHUNKED, logits_chunk=0))
    chunked = temp_bytes(CHUNKED)
    assert full > logits_bytes  # the unchunked step materializes [batch, seq, vocab]
    assert chunked < full - logits_bytes / 2
