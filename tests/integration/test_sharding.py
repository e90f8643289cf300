"""Meshes, logical-axis rules, parameter tables, sharded init, and training losses that do
not depend on the mesh (8 CPU devices against a 1-device run)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmjax import cli
from lmjax.config import Config, MeshConfig, RunConfig
from lmjax.observe import metrics
from lmjax.parallel import sharding
from lmjax.train import trainer as trainer_lib
from tests.configs import SPLITTABLE
from tests.unit.test_sharding import mesh_of


def test_state_is_created_sharded_without_a_full_copy_per_device():
    config = Config(model=SPLITTABLE, mesh=MeshConfig(fsdp=-1), run=RunConfig(steps=10))
    mesh = sharding.make_mesh(config.mesh)
    trainer = trainer_lib.make_trainer(config, mesh)
    shapes = jax.eval_shape(trainer.init_fn)
    full = sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
    memory = trainer.init_fn.lower().compile().memory_analysis()
    # Outputs are 1/8 of the state (small replicated leaves aside); no temp buffer holds a
    # whole parameter set.
    assert memory.output_size_in_bytes < full / 8 * 1.05
    assert memory.temp_size_in_bytes < full / 8
    state = trainer.init_fn()
    wq = state.params["layers"]["wq"]
    assert wq.sharding.spec == P(None, "fsdp", None, None)
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 8, 4, 16)}
    mu = jax.tree.leaves(state.opt_state)[1:]
    assert any(
        getattr(m, "shape", None) == (2, 64, 4, 16) and m.sharding.spec == wq.sharding.spec
        for m in mu
    )


TRAIN_SETS = [
    "run.steps=3",
    "run.log_every=1",
    "run.eval_batches=1",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "checkpoint.every_steps=1000",
]


# 8 query and 8 KV heads, MLP 192: every dimension divides by a tensor axis of 8 or 4.
WIDE = ["model.n_heads=8", "model.n_kv_heads=8", "model.head_dim=8"]


def _losses(workdir) -> list[float]:
    return [r["loss"] for r in metrics.read_records(workdir) if "loss" in r]


def _one_device_run(workdir, sets) -> list[float]:
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
    }
    args = [
        sys.executable,
        "-m",
        "lmjax",
        "train",
        "--experiment",
        "smoke",
        "--workdir",
        str(workdir),
    ]
    for s in sets:
        args += ["--set", s]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(workdir)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """1-device losses of the base smoke model and of the 8-head variant, sharing one
    tokenizer trained on the packaged corpus."""
    root = tmp_path_factory.mktemp("one_device")
    base = _one_device_run(root / "base", TRAIN_SETS)
    tokenizer = str(root / "base" / "tokenizer.model")
    wide = _one_device_run(root / "wide", TRAIN_SETS + WIDE + [f"data.tokenizer={tokenizer}"])
    return {"base": base, "wide": wide, "tokenizer": tokenizer}


@pytest.mark.parametrize(
    "mesh, variant",
    [
        ((8, 1, 1), "base"),
        ((1, 8, 1), "base"),
        ((2, 2, 2), "base"),
        ((1, 1, 8), "wide"),
        ((1, 2, 4), "wide"),
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_eight_device_meshes_train_like_one_device(tmp_path, references, mesh, variant):
    sets = (
        TRAIN_SETS
        + (WIDE if variant == "wide" else [])
        + [
            f"data.tokenizer={references['tokenizer']}",
            f"mesh.data={mesh[0]}",
            f"mesh.fsdp={mesh[1]}",
            f"mesh.tensor={mesh[2]}",
        ]
    )
    argv = ["train", "--experiment", "smoke", "--workdir", str(tmp_path)]
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 0
    losses = _losses(tmp_path)
    assert len(losses) == 3 and len(set(losses)) == 3  # the steps really train
    np.testing.assert_allclose(losses, references[variant], rtol=1e-5)


def _kernel_under_mesh(kernel: str):
    """The per-device attention of `kernel`, run by the Pallas interpreter."""
    from lmjax.model import attention
    from lmjax.model.flash_gpu import Tiles

    if kernel == "splash":
        return functools.partial(attention._splash, interpret=True)
    # small GPU tiles, so that each device's kernels loop over several blocks
    tiles = (Tiles(32, 16, 2, 4), Tiles(16, 16, 2, 4))
    return functools.partial(attention._pallas_gpu, tiles=tiles, interpret=True)


@pytest.mark.parametrize(
    "kernel, mesh, heads, kv_heads, rules",
    [
        ("splash", (2, 2, 2), 4, 2, ()),  # kv heads split like query heads: the kernel's grouping
        ("splash", (1, 2, 4), 8, 2, ("kv_heads=", "act_kv_heads=")),  # kv heads replicated
        ("splash", (1, 2, 4), 8, 2, ()),  # 2 kv heads cannot split 4 ways: every device gets all
        ("splash", (1, 1, 8), 8, 8, ("act_heads=",)),  # query heads whole, kv heads split
        ("splash", (2, 2, 2), 12, 3, ("kv_heads=", "act_kv_heads=")),  # groups of 4, shards of 6
        ("pallas_gpu", (2, 2, 2), 8, 4, ()),  # 2 query heads on 1 kv head per device, in place
        ("pallas_gpu", (2, 2, 2), 12, 3, ("kv_heads=", "act_kv_heads=")),
    ],
    ids=[
        "aligned",
        "kv-replicated",
        "kv-indivisible",
        "q-replicated",
        "groups-straddle",
        "gpu-aligned",
        "gpu-groups-straddle",
    ],
)
def test_pallas_kernels_per_device_match_reference_with_packed_documents(
    kernel, mesh, heads, kv_heads, rules
):
    """The TPU splash and GPU flash kernels, run by the Pallas interpreter under shard_map:
    rows over data x fsdp, heads by the rules, documents masked, on every head layout the
    rules accept."""
    from lmjax.model import attention

    per_device = _kernel_under_mesh(kernel)
    b, t, d = mesh[0] * mesh[1], 128, 8  # head_dim 8: the GPU kernel pads it to 16
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (b, t, heads, d))
    k, v = (jax.random.normal(key, (b, t, kv_heads, d)) for key in keys[1:])
    segments = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (b, t)), axis=1))
    index = jnp.arange(t)
    mask = attention.make_mask(segments, segments, index, index)
    mesh = mesh_of(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])

    def kernel_loss(q, k, v):
        with sharding.activation_sharding(
            mesh, sharding.rules_from_config(MeshConfig(rules=rules))
        ):
            return jnp.sum(per_device(q, k, v, segments) ** 2)

    def xla_loss(q, k, v):
        return jnp.sum(attention._xla(q, k, v, mask) ** 2)

    got = jax.jit(jax.value_and_grad(kernel_loss, argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(xla_loss, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
