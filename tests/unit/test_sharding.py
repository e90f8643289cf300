"""Meshes, logical-axis rules, parameter tables, sharded init, and training losses that do
not depend on the mesh (8 CPU devices against a 1-device run)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmjax import hardware
from lmjax.batch import BATCH_KEYS
from lmjax.config import ConfigError, DataConfig, MeshConfig
from lmjax.model import transformer
from lmjax.parallel import host_rows, sharding
from tests.configs import SPLITTABLE


def mesh_of(**kw):
    return sharding.make_mesh(MeshConfig(**{"fsdp": 1, **kw}))


def test_make_mesh_fills_the_free_axis_and_keeps_device_order():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()]
    four = sharding.make_mesh(MeshConfig(fsdp=-1), devices=jax.devices()[4:])
    assert dict(four.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 1}
    experts = sharding.make_mesh(MeshConfig(expert=4, fsdp=-1))
    assert dict(experts.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}


@pytest.mark.parametrize(
    "cfg, message",
    [
        (MeshConfig(data=3, fsdp=1), r"\(3, 1, 1, 1\) has 3 devices but there are 8 per slice"),
        (MeshConfig(data=2, fsdp=2, tensor=4), r"\(2, 2, 1, 4\) has 16 devices but there are 8"),
        (MeshConfig(data=-1, fsdp=-1), "at most one -1"),
        (MeshConfig(data=3, fsdp=-1), "3 does not divide the 8 devices"),
        (MeshConfig(fsdp=0), "sizes must be positive"),
        (MeshConfig(dcn_data=3), "dcn_data=3 x mesh.dcn_fsdp=1 must be positive and divide the 8"),
        (MeshConfig(dcn_data=2), r"= 2 must equal the number of processes \(1\)"),
    ],
)
def test_make_mesh_errors_show_the_numbers(cfg, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(cfg)


def _tpu_devices(accelerator, num_slices):
    from lmjax.tools import aot
    from tests import tpu_compiler

    tpu_compiler.require()
    return aot.topology_devices(hardware.parse_target(accelerator), num_slices)


def test_hybrid_mesh_puts_dcn_factors_across_tpu_slices():
    devices = _tpu_devices("v5e-4", num_slices=2)  # 2 slices of 2x2 chips
    assert sorted({d.slice_index for d in devices}) == [0, 1]

    mesh = sharding.make_mesh(MeshConfig(dcn_data=2, fsdp=-1), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    for i in range(2):  # each data index is one whole slice
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, dcn_fsdp=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    for j in range(4):  # fsdp is (slice, chip within slice), slice-major
        assert {d.slice_index for d in mesh.devices[:, j].flat} == {j // 2}

    with pytest.raises(ConfigError, match=r"= 4 must equal the number of slices \(2\)"):
        sharding.make_mesh(MeshConfig(dcn_data=4, fsdp=-1), devices)


def test_single_slice_tpu_mesh_uses_every_chip_once():
    devices = _tpu_devices("v5p-16", num_slices=1)  # 2x2x2 chips
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_rules_override_and_reject_unknown_names():
    rules = sharding.rules_from_config(MeshConfig(rules=("mlp=", "act_seq=tensor")))
    assert rules["mlp"] == () and rules["act_seq"] == ("tensor",)
    assert rules["embed"] == ("fsdp",)
    with pytest.raises(ConfigError, match="logical one of"):
        sharding.rules_from_config(MeshConfig(rules=("mpl=tensor",)))
    with pytest.raises(ConfigError, match=r"unknown mesh axes \['model'\]"):
        sharding.rules_from_config(MeshConfig(rules=("mlp=model",)))


def test_rule_conflict_is_an_error_even_on_a_size_one_axis():
    rules = sharding.rules_from_config(MeshConfig(rules=("mlp=fsdp",)))
    mesh = mesh_of(data=8)  # fsdp has size 1 here: the conflict would bite on a bigger mesh
    with pytest.raises(ConfigError, match="logical axes 'embed' and 'mlp'.*mesh axis 'fsdp'"):
        sharding.logical_to_spec(("layers", "embed", "mlp"), rules, mesh)


def test_default_rules_shard_params_zero3_style_and_activations_by_batch():
    rules = sharding.rules_from_config(MeshConfig())
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_spec(("layers", "embed", "mlp"), rules, mesh) == P(
        None, "fsdp", "tensor"
    )
    assert sharding.logical_to_spec(("act_batch", "act_seq", "act_embed"), rules, mesh) == P(
        ("data", "fsdp"), None, None
    )
    # size-1 axes vanish from specs
    assert sharding.logical_to_spec(("vocab", "embed"), rules, mesh_of(data=8)) == P(None, None)


def test_kv_heads_not_divisible_by_tensor_names_the_parameter_and_the_fix():
    mesh = mesh_of(data=2, tensor=4)
    axes = transformer.param_axes(SPLITTABLE)
    with pytest.raises(ConfigError) as e:
        sharding.tree_shardings(
            axes,
            mesh,
            sharding.rules_from_config(MeshConfig()),
            transformer.param_shapes(SPLITTABLE),
        )
    text = str(e.value)
    assert "layers/wk" in text and "'kv_heads' of size 2" in text
    assert "mesh axes ('tensor',) of size 4" in text and "mesh.rules" in text


def test_offline_layout_puts_all_local_devices_on_fsdp_and_replicates_what_cannot_split(caplog):
    """Offline commands (eval, generate, export, to-hf) put every local device on fsdp, keep
    the run's rules, and replicate (naming them) only leaves the mesh cannot divide."""
    mesh, rules = sharding.offline_mesh(MeshConfig(data=4, tensor=2, rules=("mlp=fsdp", "embed=")))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
    assert rules["mlp"] == ("fsdp",) and rules["embed"] == ()

    def layout(model_cfg, rules):
        return sharding.tree_shardings(
            transformer.param_axes(model_cfg),
            mesh,
            rules,
            transformer.param_shapes(model_cfg),
            replicate_indivisible=True,
        )

    assert layout(SPLITTABLE, rules)["layers"]["w_up"].spec == P(None, None, "fsdp")
    odd = dataclasses.replace(SPLITTABLE, d_mlp=100)  # 100 % 8 != 0: mlp cannot split
    with caplog.at_level("WARNING", logger="lmjax"):
        assert layout(odd, rules)["layers"]["w_up"].spec == P()
    assert "layers/w_up" in caplog.text and "layers/w_down" in caplog.text
    assert "layers/wq" not in caplog.text  # replicated by the rules, not for want of a divisor
    conflict = sharding.rules_from_config(MeshConfig(rules=("mlp=fsdp",)))  # embed=fsdp too
    with pytest.raises(ConfigError, match="rule conflict"):  # conflicts never fall back
        layout(odd, conflict)


def test_describe_params_lists_specs_and_bytes_per_device():
    mesh = mesh_of(fsdp=4, tensor=2)
    rules = sharding.rules_from_config(MeshConfig())
    text = sharding.describe_params(
        transformer.param_shapes(SPLITTABLE), transformer.param_axes(SPLITTABLE), mesh, rules
    )
    rows = {
        line.split()[0]: line.split()
        for line in text.splitlines()[2:]
        if "/" in line or line.startswith(("embed", "unembed", "final_norm"))
    }
    # wq [2, 64, 4, 16] f32 = 32 KiB, split 4 ways on embed and 2 on heads: 4 KiB per device
    assert rows["layers/wq"][1] == "2x64x4x16"
    assert rows["layers/wq"][2] == "layers,embed,heads,head_dim"
    assert "".join(rows["layers/wq"][3:-2]) == "(None,'fsdp','tensor',None)"
    assert rows["layers/wq"][-2:] == ["4.00", "KiB"]
    # final_norm [64] f32 split over fsdp: 64 bytes
    assert rows["final_norm"][-2:] == ["64", "B"]
    # matrices split 8 ways (fsdp x tensor), norm weights 4 ways (fsdp only); float32
    matrices = 2 * 256 * 64 + 2 * 64 * (4 + 2 + 2 + 4) * 16 + 3 * 2 * 64 * 192
    norms = 2 * 64 + 2 * 64 + 64
    total = (matrices / 8 + norms / 4) * 4
    assert text.splitlines()[0].startswith("mesh {'data': 1, 'fsdp': 4, 'expert': 1, 'tensor': 2}")
    assert "WARNING" not in text
    per_device = [line for line in text.splitlines() if line.startswith("parameters per device")]
    assert per_device == [f"parameters per device: {total / 1024:.2f} KiB"]


def test_describe_params_warns_about_big_replicated_parameters():
    rules = sharding.rules_from_config(MeshConfig(rules=("embed=", "vocab=")))
    shapes, axes = transformer.param_shapes(SPLITTABLE), transformer.param_axes(SPLITTABLE)
    text = sharding.describe_params(
        shapes, axes, mesh_of(fsdp=8), rules, replicated_warn_elements=10_000
    )
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert any(
        w.startswith("WARNING: embed (256, 64)") and "replicated on all 8 devices" in w
        for w in warnings
    )
    assert not any("final_norm" in w for w in warnings)  # 64 elements: below the threshold
    one_device = sharding.make_mesh(MeshConfig(fsdp=-1), jax.devices()[:1])
    assert "WARNING" not in sharding.describe_params(
        shapes, axes, one_device, rules, replicated_warn_elements=10_000
    )


def test_shard_map_logical_gives_each_device_its_block():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    rules = sharding.rules_from_config(MeshConfig())
    local_rows = lambda x: jnp.full_like(x, x.shape[0] * 100 + x.shape[2])
    x = jnp.zeros((8, 3, 4))
    axes = ("act_batch", None, "act_heads")
    assert int(sharding.shard_map_logical(local_rows, [axes], axes)(x)[0, 0, 0]) == 804
    with sharding.activation_sharding(mesh, rules):
        out = jax.jit(sharding.shard_map_logical(local_rows, [axes], axes))(x)
    assert out.shape == (8, 3, 4) and np.all(np.asarray(out) == 202)  # 8/(2*2) rows, 4/2 heads


def test_pipelines_serve_any_set_of_global_rows():
    """A process feeds the rows its devices hold (`process_rows`), not necessarily a
        contiguous share: every source serves an arbitrary ascending set of global rows (stores:
    tests/unit/test_data.py)."""
    from lmjax.data import pipeline

    data_cfg = DataConfig(source="synthetic", batch_size=8, seq_len=16)
    full = pipeline.make_pipeline(data_cfg, None, vocab_size=97)
    part = pipeline.make_pipeline(data_cfg, None, rows=[1, 2, 6], vocab_size=97)
    for got, want in zip(
        part.eval_batches(1) + [next(part.train_batches(3))],
        full.eval_batches(1) + [next(full.train_batches(3))],
    ):
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(got[k], want[k][[1, 2, 6]])
    with pytest.raises(ConfigError, match="ascending global row indices"):
        pipeline.make_pipeline(data_cfg, None, rows=[3, 1], vocab_size=97)


def test_process_rows_and_global_batch_on_one_process():
    mesh = mesh_of(data=2, fsdp=2, tensor=2)
    batch_sharding = sharding.batch_sharding(mesh, sharding.rules_from_config(MeshConfig()))
    assert sharding.batch_shard_count(batch_sharding) == 4
    np.testing.assert_array_equal(sharding.process_rows(batch_sharding, 8), np.arange(8))
    with pytest.raises(ConfigError, match="data.batch_size=6 is not divisible by the 4 batch"):
        sharding.process_rows(batch_sharding, 6)
    local = {k: np.arange(8 * 3).reshape(8, 3) + i for i, k in enumerate(BATCH_KEYS)}
    batch = host_rows.global_batch(local, batch_sharding)
    for k in BATCH_KEYS:
        assert batch[k].sharding == batch_sharding
        np.testing.assert_array_equal(np.asarray(batch[k]), local[k])
        for shard in batch[k].addressable_shards:  # each device holds its own rows
            np.testing.assert_array_equal(shard.data, local[k][shard.index])
