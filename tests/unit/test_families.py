"""Qwen2, Qwen3, Mistral, Gemma 2 and Gemma 3 on lmjax's one model, without torch.

Small random checkpoints are written in HF's safetensors layout with an HF config.json,
imported with `lmjax.convert.hf.load`, and held against tests/numpy_llama.py (HF's
conventions, float64): logits to 1e-4, and every parameter's gradient against central
finite differences of the reference's loss. Each family's switches are thereby covered in
the forward and the backward pass.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.commands.experiment import load_experiment
from lmjax.config import Config, ConfigError, ModelConfig
from lmjax.config_checks import validate
from lmjax.convert import families, hf
from lmjax.model import flops, transformer
from tests import numpy_llama
from tests.unit.test_convert import read_hf_tensors, write_hf_dir

_SHAPES = {
    "vocab_size": 256,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


_GEMMA = {
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 8,  # not head_dim, so that a wrong scale shows
    "sliding_window": 6,
    "tie_word_embeddings": True,
}


FAMILY_CONFIGS = {
    "qwen2": {**_SHAPES, "model_type": "qwen2", "hidden_act": "silu", "use_sliding_window": False},
    "qwen3": {
        **_SHAPES,
        "model_type": "qwen3",
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": True,
    },
    "mistral": {**_SHAPES, "model_type": "mistral", "hidden_act": "silu", "sliding_window": 5},
    "mixtral": {
        **_SHAPES,
        "model_type": "mixtral",
        "hidden_act": "silu",
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": None,
    },
    "qwen3_moe": {
        **_SHAPES,
        "model_type": "qwen3_moe",
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 24,
        "norm_topk_prob": False,  # the other router kind than mixtral's
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
    "gemma2": {
        **_SHAPES,
        **_GEMMA,
        "model_type": "gemma2",
        "attn_logit_softcapping": 1.0,
        "final_logit_softcapping": 3.0,
    },
    "gemma3_text": {
        **_SHAPES,
        **_GEMMA,
        "model_type": "gemma3_text",
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window_pattern": 3,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
    },
}


TOKENS = np.random.default_rng(0).integers(0, 256, (2, 32))


# Two documents per row, positions restarting, as packed training batches hold them.
SEGMENTS = np.repeat([[1, 2], [1, 2]], [20, 12], axis=1)


POSITIONS = np.concatenate([np.arange(20), np.arange(12)])[None].repeat(2, 0)


_forward = jax.jit(transformer.forward, static_argnums=2)


def _load(tmp_path, name, seed=1):
    config = FAMILY_CONFIGS[name]
    tensors = numpy_llama.random_checkpoint(config, seed=seed)
    cfg, params = hf.load(write_hf_dir(tmp_path / name, config, tensors))
    cfg = dataclasses.replace(cfg, dtype="float32", attention="xla", remat="none")
    return config, tensors, cfg, params


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_imported_checkpoint_matches_numpy_reference(tmp_path, name):
    config, tensors, cfg, params = _load(tmp_path, name)
    got = _forward(
        jax.tree.map(jnp.asarray, params),
        jnp.asarray(TOKENS),
        cfg,
        segment_ids=jnp.asarray(SEGMENTS),
        positions=jnp.asarray(POSITIONS),
    )
    want = numpy_llama.forward(tensors, config, TOKENS, positions=POSITIONS, segment_ids=SEGMENTS)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_to_hf_round_trip_is_lossless(tmp_path, name):
    config, tensors, cfg, params = _load(tmp_path, name)
    assert families.of_config(cfg).model_type == name
    hf.save(cfg, params, tmp_path / "out")
    written = read_hf_tensors(tmp_path / "out")
    assert sorted(written) == sorted(tensors)
    for tensor_name, array in tensors.items():
        np.testing.assert_array_equal(written[tensor_name], array, err_msg=tensor_name)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in config.items():
        assert out.get(key) == value, key
    cfg2, params2 = hf.load(tmp_path / "out")
    assert dataclasses.replace(cfg2, dtype="float32", attention="xla", remat="none") == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_family_switches_are_read_from_config_json():
    cfg = {n: hf.config_from_hf(c) for n, c in FAMILY_CONFIGS.items()}
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].qk_norm
    assert cfg["qwen3"].qk_norm and not cfg["qwen3"].norm_offset
    assert (cfg["mistral"].sliding_window, cfg["mistral"].global_every) == (5, 0)
    g2, g3 = cfg["gemma2"], cfg["gemma3_text"]
    assert (g2.norm_offset, g2.scale_embeddings, g2.post_norms, g2.mlp_activation) == (
        True,
        True,
        True,
        "gelu_tanh",
    )
    assert (g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar) == (1.0, 3.0, 8.0)
    assert transformer.layer_is_local(g2) == (True, False, True)
    assert transformer.layer_is_local(g3) == (True, True, False)
    assert (g3.rope_local_theta, g3.rope_scaling_type, g3.rope_scaling_factor) == (
        10000.0,
        "linear",
        8.0,
    )
    assert (g3.attn_softcap, g3.final_softcap, g3.qk_norm) == (0.0, 0.0, True)
    # transformers >= 5: layer_types and per-kind rope_parameters instead.
    newer = {
        k: v
        for k, v in FAMILY_CONFIGS["gemma3_text"].items()
        if k not in ("rope_theta", "rope_scaling", "rope_local_base_freq", "sliding_window_pattern")
    }
    newer["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    newer["layer_types"] = ["sliding_attention"] * 2 + ["full_attention"]
    newer["sliding_window_pattern"] = 3
    assert hf.config_from_hf(newer) == g3


@pytest.mark.parametrize(
    "name,change,message",
    [
        ("qwen2", {"use_sliding_window": True}, "full attention in every layer"),
        ("qwen3", {"attention_bias": True}, "without biases"),
        ("gemma2", {"hidden_activation": "gelu"}, "tanh-approximated GELU"),
        ("gemma2", {"layer_types": ["full_attention"] * 3}, "pattern cannot be converted"),
        ("gemma3_text", {"model_type": "gemma3"}, "text_config"),
        ("mistral", {"model_type": "falcon"}, "lmjax converts 'llama', 'mistral'"),
    ],
)
def test_unsupported_family_configs_are_refused(name, change, message):
    with pytest.raises(ConfigError, match=message):
        hf.config_from_hf({**FAMILY_CONFIGS[name], **change})


def test_to_hf_refuses_switches_no_family_has():
    cfg = ModelConfig(qkv_bias=True, norm_offset=True)
    with pytest.raises(ConfigError, match="no Hugging Face family has.*qkv_bias"):
        hf.config_to_hf(cfg, "float32")
    # qwen3_moe reads its router from norm_topk_prob, which cannot say sigmoid (nor a scale)
    for switch in ({"moe_router": "sigmoid_topk_bias"}, {"moe_routed_scale": 2.5}):
        moe = ModelConfig(qk_norm=True, moe_experts=4, **switch)
        with pytest.raises(ConfigError, match="no Hugging Face family has"):
            hf.config_to_hf(moe, "float32")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"global_every": 2}, "model.global_every=2 acts on local layers.*sliding_window"),
        ({"rope_local_theta": 1e4}, "model.rope_local_theta=10000.0 acts on local layers"),
        ({"sliding_window": -1}, "model.sliding_window=-1 must be 0"),
        ({"attn_softcap": -1.0}, "model.attn_softcap=-1.0 must be 0"),
        ({"mlp_activation": "relu"}, "model.mlp_activation='relu': choose one of"),
        ({"rope_scaling_type": "yarn"}, "model.rope_scaling_type='yarn': choose one of"),
        ({"attention": "cudnn", "attn_softcap": 50.0}, "cudnn implements no attention soft"),
    ],
)
def test_family_fields_are_validated_with_the_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(Config(model=dataclasses.replace(ModelConfig(), **change)))


@pytest.mark.parametrize(
    "name, total",
    [
        # the bfloat16 total_size of each model.safetensors.index.json, halved
        ("mistral_7b", 7_241_732_096),  # mistralai/Mistral-7B-v0.1
        ("qwen3_8b", 8_190_735_360),  # Qwen/Qwen3-8B
    ],
)
def test_family_presets_have_the_published_parameter_counts(name, total):
    cfg = load_experiment(name).model
    assert transformer.count_params(cfg) == total
    assert families.of_config(cfg).model_type == name.split("_")[0]


def test_flops_count_only_the_keys_inside_each_window():
    """Gemma-style: 2 of 3 layers local with window 4 over 16 tokens: a local layer's
    queries see 1, 2, 3, then 4 keys (58 of 256 pairs, counted as 16 * (4 - 16/32) = 56
    in the same continuous form as the global layers' 16**2 / 2 = 128)."""
    base = ModelConfig(n_layers=3, n_heads=2, head_dim=8)
    gemma = dataclasses.replace(base, sliding_window=4, global_every=3)
    assert flops.attended_keys(base, 16) == 3 * 8
    assert flops.attended_keys(gemma, 16) == 2 * 3.5 + 8
    wide = dataclasses.replace(gemma, sliding_window=16)
    assert flops.flops_per_token(wide, 16) == flops.flops_per_token(base, 16)
    saved = flops.flops_per_token(base, 16) - flops.flops_per_token(gemma, 16)
    assert saved == 12 * 2 * 8 * 2 * (8 - 3.5)
