"""Hugging Face Llama interop without torch.

HF-format directories are written here straight from HF's naming convention (numpy +
safetensors, not through lmjax.convert.hf.TABLE), loaded with `lmjax.convert.hf.load`, and
the lmjax float32 logits are held against tests/numpy_llama.py, which reads the HF tensors
directly ([out, in] weights, rotate-half RoPE).
"""

import dataclasses
import json
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from lmjax.checkpoint import params_dir
from lmjax.commands import convert as convert_command
from lmjax.config import ConfigError
from lmjax.convert import hf
from lmjax.model import transformer
from tests import numpy_llama

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
LLAMA31 = {
    **BASE,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        # A short original context puts all three frequency bands within 32 positions.
        "original_max_position_embeddings": 64,
    },
}
VARIANTS = {
    "gqa-untied": BASE,
    "gqa-tied": {**BASE, "tie_word_embeddings": True},
    "mqa": {**BASE, "num_key_value_heads": 1},
    "llama31-rope": LLAMA31,
    # Llama-2 style: no head_dim or num_key_value_heads keys (defaults: hidden/heads, MHA).
    "llama2-defaults": {
        k: v for k, v in BASE.items() if k not in ("head_dim", "num_key_value_heads")
    },
    # transformers >= 5 style rope settings.
    "rope-parameters": {
        **{k: v for k, v in LLAMA31.items() if k not in ("rope_scaling", "rope_theta")},
        "rope_parameters": {**LLAMA31["rope_scaling"], "rope_theta": 10000.0},
    },
}


def write_hf_dir(path, config, tensors, *, shards=1, dtype=np.float32):
    """An HF checkpoint directory: config.json plus one file or `shards` files and an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for k in range(shards):
        filename = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(path / filename), metadata={"format": "pt"})
        weight_map.update({n: filename for n in part})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": weight_map,
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


def read_hf_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def lmjax_logits(cfg, params, tokens):
    cfg = dataclasses.replace(cfg, dtype="float32", attention="xla", remat="none")
    return np.asarray(
        transformer.forward(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), cfg)
    )


TOKENS = np.random.default_rng(0).integers(0, 256, (2, 32))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loaded_checkpoint_matches_numpy_reference(tmp_path, name):
    config = VARIANTS[name]
    tensors = numpy_llama.random_checkpoint(config, seed=1)
    cfg, params = hf.load(write_hf_dir(tmp_path / "hf", config, tensors))
    assert cfg.tie_embeddings == config["tie_word_embeddings"]
    assert ("unembed" in params) != cfg.tie_embeddings
    # numpy_llama reads the older rope keys; "rope-parameters" is LLAMA31 in the newer form.
    want = numpy_llama.forward(tensors, LLAMA31 if name == "rope-parameters" else config, TOKENS)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(lmjax_logits(cfg, params, TOKENS), want, atol=1e-4, rtol=0)


def test_config_fields_are_read(tmp_path):
    config = {**LLAMA31, "num_hidden_layers": 1, "rope_theta": 500000, "rms_norm_eps": 1e-6}
    cfg = hf.config_from_hf(config)
    assert (
        cfg.vocab_size,
        cfg.d_model,
        cfg.n_layers,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.d_mlp,
        cfg.max_seq_len,
    ) == (256, 32, 1, 4, 2, 16, 64, 64)
    assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)
    assert (
        cfg.norm_eps,
        cfg.rope_scaling_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_max_len,
    ) == (1e-6, 8.0, 1.0, 4.0, 64)
    assert cfg.param_dtype == "float32"
    assert hf.config_from_hf(BASE).rope_scaling_factor == 0


def test_sharded_index_loads_like_a_single_file(tmp_path):
    tensors = numpy_llama.random_checkpoint(BASE, seed=2)
    _, single = hf.load(write_hf_dir(tmp_path / "one", BASE, tensors))
    _, sharded = hf.load(write_hf_dir(tmp_path / "three", BASE, tensors, shards=3))
    assert len(list((tmp_path / "three").glob("*.safetensors"))) == 3
    jax.tree.map(np.testing.assert_array_equal, single, sharded)


def test_bfloat16_checkpoint_upcasts_exactly(tmp_path):
    tensors = numpy_llama.random_checkpoint(BASE, seed=3)
    path = write_hf_dir(tmp_path / "hf", BASE, tensors, dtype=ml_dtypes.bfloat16)
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    cfg, params = hf.load(path)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in tensors.items()}
    assert params["embed"].dtype == np.float32
    np.testing.assert_array_equal(params["embed"], rounded["model.embed_tokens.weight"])
    np.testing.assert_allclose(
        lmjax_logits(cfg, params, TOKENS),
        numpy_llama.forward(rounded, BASE, TOKENS),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize(
    "config", [BASE, {**LLAMA31, "tie_word_embeddings": True}], ids=["untied", "tied-llama31"]
)
def test_save_load_round_trip_is_exact(tmp_path, config):
    tensors = numpy_llama.random_checkpoint(config, seed=4)
    cfg, params = hf.load(write_hf_dir(tmp_path / "hf", config, tensors))
    hf.save(cfg, jax.tree.map(jnp.asarray, params), tmp_path / "out")  # from device arrays
    written = read_hf_tensors(tmp_path / "out")
    assert sorted(written) == sorted(tensors)
    for name, array in tensors.items():
        assert written[name].dtype == np.float32
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    cfg2, params2 = hf.load(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)

    out = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in (
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "tie_word_embeddings",
        "vocab_size",
        "max_position_embeddings",
        "torch_dtype",
        "hidden_act",
    ):
        assert out[key] == config.get(key), key
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}


def test_save_shards_and_casts(tmp_path):
    tensors = numpy_llama.random_checkpoint(BASE, seed=5)
    cfg, params = hf.load(write_hf_dir(tmp_path / "hf", BASE, tensors))
    hf.save(cfg, params, tmp_path / "out", dtype="bfloat16", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and sorted(index["weight_map"]) == sorted(tensors)
    assert files == sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    written = read_hf_tensors(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in written.values())
    for name, array in tensors.items():
        assert written[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(written[name], array.astype(ml_dtypes.bfloat16), err_msg=name)
    _, params2 = hf.load(tmp_path / "out")
    np.testing.assert_array_equal(
        params2["layers"]["wo"],
        params["layers"]["wo"].astype(ml_dtypes.bfloat16).astype(np.float32),
    )
    with pytest.raises(ConfigError, match="do not match the model config"):
        hf.save(dataclasses.replace(cfg, n_layers=3), params, tmp_path / "other")
    with pytest.raises(ConfigError, match="not empty"):
        hf.save(cfg, params, tmp_path / "out")


def test_table_covers_every_parameter_exactly_once():
    for tie in (False, True):
        cfg = dataclasses.replace(hf.config_from_hf(BASE), tie_embeddings=tie)
        paths = [e.path for e, _, index, _ in hf._entries(cfg) if not any(index or ())]
        leaves = [
            tuple(k.key for k in p)
            for p, _ in jax.tree_util.tree_leaves_with_path(transformer.param_shapes(cfg))
        ]
        assert sorted(paths) == sorted(leaves)


def test_params_dir_round_trip_through_the_cli_functions(tmp_path, capsys):
    tensors = numpy_llama.random_checkpoint(LLAMA31, seed=6)
    hf_dir = write_hf_dir(tmp_path / "hf", LLAMA31, tensors)
    convert_command.from_hf(str(hf_dir), str(tmp_path / "lmjax"))
    assert (tmp_path / "lmjax" / "params").is_dir()
    cfg, params = params_dir.load(tmp_path / "lmjax")
    cfg0, params0 = hf.load(hf_dir)
    assert cfg == cfg0
    jax.tree.map(np.testing.assert_array_equal, params, params0)
    with pytest.raises(ConfigError, match="already holds"):
        convert_command.from_hf(str(hf_dir), str(tmp_path / "lmjax"))

    convert_command.to_hf(str(tmp_path / "lmjax"), str(tmp_path / "back"))
    written = read_hf_tensors(tmp_path / "back")
    assert sorted(written) == sorted(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="not empty"):
        convert_command.to_hf(str(tmp_path / "lmjax"), str(tmp_path / "back"))
    with pytest.raises(ConfigError, match="not an lmjax params directory"):
        params_dir.load(tmp_path / "hf")


def test_pickle_checkpoints_are_refused_and_never_opened(tmp_path):
    path = tmp_path / "torch"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(BASE))
    (path / "pytorch_model.bin").write_bytes(b"not a pickle; must never be read")
    with pytest.raises(ConfigError, match="pickle.*safetensors"):
        hf.load(path)
    # With safetensors next to it, the .bin is ignored.
    write_hf_dir(path, BASE, numpy_llama.random_checkpoint(BASE, seed=7))
    cfg, _ = hf.load(path)
    assert cfg.n_layers == 2


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "falcon"}, "lmjax converts 'llama'"),
        ({"attention_bias": True}, "without biases"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
        ({"num_key_value_heads": 3}, "multiple of key/value heads"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        hf.config_from_hf({**BASE, **change})


def test_missing_extra_and_misshapen_tensors_are_refused(tmp_path):
    tensors = numpy_llama.random_checkpoint(BASE, seed=8)
    missing = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConfigError, match="model.layers.1.mlp.up_proj.weight"):
        hf.load(write_hf_dir(tmp_path / "missing", BASE, missing))
    extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(ConfigError, match="q_proj.bias"):
        hf.load(write_hf_dir(tmp_path / "extra", BASE, extra))
    wrong = {**tensors, "model.layers.0.self_attn.k_proj.weight": np.zeros((16, 32), np.float32)}
    with pytest.raises(ConfigError, match=r"k_proj.weight has shape \(16, 32\).*\(32, 32\)"):
        hf.load(write_hf_dir(tmp_path / "wrong", BASE, wrong))


def test_transformers_loads_the_saved_checkpoint(tmp_path):
    """Runs only where torch and transformers are installed (they are not lmjax dependencies)."""
    torch = pytest.importorskip("torch", reason="torch is not installed: HF cross-check skipped")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    tensors = numpy_llama.random_checkpoint(LLAMA31, seed=9)
    cfg, params = hf.load(write_hf_dir(tmp_path / "hf", LLAMA31, tensors))
    hf.save(cfg, params, tmp_path / "out")
    hf_model = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "out"), torch_dtype=torch.float32
    )
    with torch.no_grad():
        want = hf_model(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(lmjax_logits(cfg, params, TOKENS), want, atol=1e-4, rtol=0)


# 8 layers of 64-wide MLPs: 2.1 MB of float32 weights, the largest tensor 64 KiB (1/32).
DEEP = {**BASE, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 8}


@pytest.mark.parametrize("family", ["llama-deep", "mixtral"])
def test_from_hf_streams_one_tensor_at_a_time_and_writes_what_the_in_memory_path_did(
    tmp_path, family
):
    """`convert from-hf` reads and writes one tensor at a time (numpy's allocations, which
    tracemalloc sees, peak at a few tensors, not the model), into a params directory that
    restores to exactly what the in-memory path (`hf.load` + `params_dir.save`) wrote, its
    stacked leaves chunked one layer's (and one expert's) slice each."""
    from tests.unit.test_families import FAMILY_CONFIGS  # it imports this module

    config = DEEP if family == "llama-deep" else FAMILY_CONFIGS[family]
    tensors = numpy_llama.random_checkpoint(config, seed=7)
    hf_dir = write_hf_dir(tmp_path / "hf", config, tensors, shards=2)
    largest = max(a.nbytes for a in tensors.values())
    from orbax.checkpoint._src.serialization import tensorstore_utils  # noqa: F401  (imported
    from safetensors import safe_open  # noqa: F401  first: tracemalloc counts an import's memory)

    tracemalloc.start()
    convert_command.from_hf(str(hf_dir), str(tmp_path / "streamed"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total = sum(a.nbytes for a in tensors.values())
    # a few copies of the tensor in hand (as read, transposed, cast) and of the one before it
    assert peak < min(5 * largest, total / 2), (peak, largest, total)
    cfg, want = hf.load(hf_dir)
    params_dir.save(cfg, want, tmp_path / "in_memory")
    _, old = params_dir.load(tmp_path / "in_memory")
    got_cfg, got = params_dir.load(tmp_path / "streamed")
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, old)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    chunked = [("layers.wq", 1)] + ([("moe.w_up", 2)] if family == "mixtral" else [])
    for leaf, stacked in chunked:
        zarray = json.loads((tmp_path / "streamed" / "params" / leaf / ".zarray").read_text())
        assert zarray["chunks"] == [1] * stacked + zarray["shape"][stacked:]
    with pytest.raises(ConfigError, match="already holds"):
        convert_command.from_hf(str(hf_dir), str(tmp_path / "streamed"))
    (tmp_path / "streamed" / "model_config.json").unlink()  # as a kill before the end leaves it
    with pytest.raises(ConfigError, match="not an lmjax params directory"):  # never read
        params_dir.load(tmp_path / "streamed")
    with pytest.raises(ConfigError, match="interrupted conversion"):
        convert_command.from_hf(str(hf_dir), str(tmp_path / "streamed"))
