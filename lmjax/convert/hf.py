"""Hugging Face Llama checkpoints <-> lmjax parameters, through one name-and-transform table.

`TABLE` pairs each HF tensor name with an lmjax parameter path and says how the array
moves between them; `load` and `save` both walk it. HF `nn.Linear` weights are
`[out, in]`; lmjax keeps `[in, out]` with the heads split out (wq `[embed, heads,
head_dim]`, wo `[heads, head_dim, embed]`) and the layers stacked on a leading axis.
lmjax applies RoPE in HF's rotate-half form, so q/k need no permutation.

Only safetensors are read: PyTorch `.bin`/`.pt` files are pickles, which can run code when
loaded, and are refused with instructions to convert them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import typing
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers np.dtype("bfloat16"))
import numpy as np

from lmjax.config import ConfigError, ModelConfig
from lmjax.model import transformer

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> one lmjax parameter (one layer's slice for `layers/...`).

    `in_axes` is 0 for arrays stored identically on both sides (embeddings, norms). For a
    Linear weight it is how many leading lmjax axes make up the input dimension: the HF
    array is the transpose of the lmjax array flattened to `[prod(in axes), prod(rest)]`.
    """

    hf: str  # "{i}" stands for the layer index
    path: tuple[str, ...]
    in_axes: int

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF shape for an lmjax (per-layer) shape."""
        if self.in_axes == 0:
            return shape
        return (math.prod(shape[self.in_axes :]), math.prod(shape[: self.in_axes]))

    def to_lmjax(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return array.reshape(shape) if self.in_axes == 0 else array.T.reshape(shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.in_axes == 0:
            return array
        return array.reshape(math.prod(array.shape[: self.in_axes]), -1).T


TABLE: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", ("embed",), 0),
    Entry("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm"), 0),
    Entry("model.layers.{i}.self_attn.q_proj.weight", ("layers", "wq"), 1),
    Entry("model.layers.{i}.self_attn.k_proj.weight", ("layers", "wk"), 1),
    Entry("model.layers.{i}.self_attn.v_proj.weight", ("layers", "wv"), 1),
    Entry("model.layers.{i}.self_attn.o_proj.weight", ("layers", "wo"), 2),
    Entry("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm"), 0),
    Entry("model.layers.{i}.mlp.gate_proj.weight", ("layers", "w_gate"), 1),
    Entry("model.layers.{i}.mlp.up_proj.weight", ("layers", "w_up"), 1),
    Entry("model.layers.{i}.mlp.down_proj.weight", ("layers", "w_down"), 1),
    Entry("model.norm.weight", ("final_norm",), 0),
    Entry("lm_head.weight", ("unembed",), 1),  # absent when the embeddings are tied
)

# HF config.json key <-> ModelConfig field, and the keys of a "llama3" rope_scaling block.
CONFIG_KEYS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "d_model"),
    ("num_hidden_layers", "n_layers"),
    ("num_attention_heads", "n_heads"),
    ("num_key_value_heads", "n_kv_heads"),
    ("head_dim", "head_dim"),
    ("intermediate_size", "d_mlp"),
    ("max_position_embeddings", "max_seq_len"),
    ("rope_theta", "rope_theta"),
    ("rms_norm_eps", "norm_eps"),
    ("tie_word_embeddings", "tie_embeddings"),
    ("initializer_range", "init_std"),
)
ROPE_SCALING_KEYS = (
    ("factor", "rope_scaling_factor"),
    ("low_freq_factor", "rope_low_freq_factor"),
    ("high_freq_factor", "rope_high_freq_factor"),
    ("original_max_position_embeddings", "rope_original_max_len"),
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A RoPE buffer some exports include; lmjax derives the frequencies from config.json.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TORCH_DTYPES = ("float32", "bfloat16", "float16")
_FIELD_TYPES = typing.get_type_hints(ModelConfig)


def _entries(cfg: ModelConfig):
    """Yields (entry, hf_name, layer index or None, per-layer lmjax shape) for `cfg`."""
    specs = transformer.param_specs(cfg)
    for entry in TABLE:
        node = specs
        for key in entry.path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:  # e.g. unembed of a tied model
            continue
        if entry.path[0] == "layers":
            for i in range(cfg.n_layers):
                yield entry, entry.hf.format(i=i), i, node.shape[1:]
        else:
            yield entry, entry.hf, None, node.shape


# ---------------------------------------------------------------- config


def _check_llama(hf: dict) -> None:
    """A ConfigError unless `hf` describes a Llama that lmjax's model implements."""
    if hf.get("model_type") != "llama":
        raise ConfigError(
            f"config.json has model_type={hf.get('model_type')!r}; only Llama "
            '(model_type "llama") checkpoints can be converted'
        )
    for key, ok, what in (
        ("hidden_act", "silu", "a SwiGLU MLP with silu"),
        ("attention_bias", False, "attention without biases"),
        ("mlp_bias", False, "an MLP without biases"),
    ):
        if hf.get(key, ok) != ok:
            raise ConfigError(f"config.json has {key}={hf[key]!r}; lmjax's Llama uses {what}")
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if k not in hf
    ]
    if missing:
        raise ConfigError(f"config.json lacks {missing}: is this a Llama config.json?")


def config_from_hf(hf: dict, *, param_dtype: str = "float32") -> ModelConfig:
    """A ModelConfig from an HF Llama `config.json` dict; unsupported features are errors."""
    _check_llama(hf)
    # transformers >= 5 writes rope settings as "rope_parameters"; older files as
    # "rope_theta" plus "rope_scaling".
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    values = {
        "num_key_value_heads": hf["num_attention_heads"],
        "head_dim": hf["hidden_size"] // hf["num_attention_heads"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "initializer_range": ModelConfig.init_std,
    }
    values.update({k: v for k, v in hf.items() if v is not None})
    fields = {field: _FIELD_TYPES[field](values[key]) for key, field in CONFIG_KEYS}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        absent = [k for k, _ in ROPE_SCALING_KEYS if k not in rope]
        if absent:
            raise ConfigError(f"config.json rope_scaling of type llama3 lacks {absent}")
        fields.update({field: _FIELD_TYPES[field](rope[key]) for key, field in ROPE_SCALING_KEYS})
    elif rope_type != "default":
        raise ConfigError(
            f"config.json uses rope_type={rope_type!r}; lmjax implements plain "
            'RoPE and Llama-3.1 ("llama3") scaling only'
        )
    cfg = ModelConfig(**fields, param_dtype=param_dtype)
    if cfg.n_heads % cfg.n_kv_heads or cfg.head_dim % 2:
        raise ConfigError(
            f"config.json has {cfg.n_heads} attention heads, {cfg.n_kv_heads} "
            f"key/value heads and head_dim {cfg.head_dim}: heads must be a "
            "multiple of key/value heads and head_dim even"
        )
    return cfg


def config_to_hf(cfg: ModelConfig, torch_dtype: str) -> dict:
    """The `config.json` of `LlamaForCausalLM` for `cfg`."""
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    hf.update({key: getattr(cfg, field) for key, field in CONFIG_KEYS})
    hf["rope_scaling"] = None
    if cfg.rope_scaling_factor > 0:
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            **{key: getattr(cfg, field) for key, field in ROPE_SCALING_KEYS},
        }
    hf["torch_dtype"] = torch_dtype
    return hf


# ---------------------------------------------------------------- safetensors files


def _tensor_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it; refuses pickle-only directories."""
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: hf_dir / f for name, f in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.exists()})
        if absent:
            raise ConfigError(f"{index} names shards that are missing: {absent}")
        return files
    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ConfigError(
                f"{hf_dir} holds only PyTorch pickle files ({', '.join(pickles)}). lmjax never "
                "loads pickles (they can run arbitrary code). Convert them to safetensors "
                "first, e.g. with transformers: LlamaForCausalLM.from_pretrained(dir)"
                ".save_pretrained(new_dir, safe_serialization=True)"
            )
        raise ConfigError(f"{hf_dir} has no *.safetensors files")
    from safetensors import safe_open

    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="np") as f:
            files.update({name: shard for name in f.keys()})
    return files


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory: config.json is missing")
    return json.loads(path.read_text())


def load(hf_dir: str | os.PathLike, *, param_dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Reads an HF Llama directory (config.json + safetensors, single or sharded).

    Returns (ModelConfig, params) with params as host numpy arrays in `param_dtype`, shaped
    as `lmjax.model.transformer.param_shapes`. bfloat16/float16 checkpoints are upcast exactly.
    """
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    cfg = config_from_hf(read_hf_config(hf_dir), param_dtype=param_dtype)
    files = _tensor_files(hf_dir)
    wanted = {name for _, name, _, _ in _entries(cfg)}
    missing = sorted(wanted - set(files))
    if missing:
        raise ConfigError(
            f"{hf_dir} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            " that a Llama with this config.json needs"
        )
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unknown = sorted(
        n for n in set(files) - wanted - ignorable if not n.endswith(_IGNORED_SUFFIXES)
    )
    if unknown:
        raise ConfigError(
            f"{hf_dir} has tensors lmjax's Llama does not use: {unknown[:5]}; "
            "biases or extra modules mean this is not a plain Llama"
        )

    dtype = np.dtype(param_dtype)
    shapes = transformer.param_shapes(cfg)
    params = _map_tree(lambda s: np.empty(s.shape, dtype), shapes)
    with contextlib.ExitStack() as stack:
        handles = {
            p: stack.enter_context(safe_open(str(p), framework="np"))
            for p in sorted(set(files[n] for n in wanted))
        }
        for entry, name, layer, shape in _entries(cfg):
            array = handles[files[name]].get_tensor(name)
            if tuple(array.shape) != entry.hf_shape(shape):
                raise ConfigError(
                    f"{name} has shape {tuple(array.shape)} but config.json implies "
                    f"{entry.hf_shape(shape)}"
                )
            target = _get(params, entry.path)
            target[layer if layer is not None else ...] = entry.to_lmjax(array, shape).astype(dtype)
    return cfg, params


def _plan_shards(
    cfg: ModelConfig, itemsize: int, max_shard_bytes: int
) -> tuple[list[list[tuple[Entry, str, int | None]]], int]:
    """([shard: [(table entry, HF name, layer or None)]], total bytes): tensors in table
    order, a new shard whenever the next tensor would take one past `max_shard_bytes`."""
    shards: list[list[tuple[Entry, str, int | None]]] = [[]]
    size = total = 0
    for entry, name, layer, shape in _entries(cfg):
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((entry, name, layer))
        size += nbytes
        total += nbytes
    return shards, total


def save(
    cfg: ModelConfig,
    params: Params,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes an HF Llama directory that `LlamaForCausalLM.from_pretrained` loads.

    Args:
      cfg: the model's config.
      params: host-addressable params (numpy or fully addressable jax arrays).
      out_dir: a new or empty directory.
      dtype: "float32", "bfloat16" or "float16" for the written tensors; None keeps the
        params' dtype.
      max_shard_bytes: above this total size the tensors are split into
        `model-0000k-of-0000n.safetensors` files with a `model.safetensors.index.json`.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    require_empty(out_dir)
    transformer.check_param_shapes(cfg, params)
    params = _map_tree(np.asarray, params)  # one device-to-host copy per array
    dtype = dtype or str(params["embed"].dtype)
    if dtype not in _TORCH_DTYPES:
        raise ConfigError(f"cannot write dtype {dtype!r}; choose one of {sorted(_TORCH_DTYPES)}")
    np_dtype = np.dtype(dtype)
    # The shards are planned from shapes alone, then converted one shard at a time.
    shards, total = _plan_shards(cfg, np_dtype.itemsize, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for filename, shard in zip(names, shards):
        tensors = {}
        for entry, name, layer in shard:
            array = _get(params, entry.path)
            array = array[layer] if layer is not None else array
            tensors[name] = np.ascontiguousarray(entry.to_hf(array).astype(np_dtype))
            weight_map[name] = filename
        # transformers requires the "format" header field.
        save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    hf_config = config_to_hf(cfg, dtype)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


# ---------------------------------------------------------------- helpers


def _get(tree: Params, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _map_tree(fn, tree):
    return {k: _map_tree(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def require_empty(out_dir: Path) -> None:
    """A ConfigError unless `out_dir` is new or empty (checked before slow reads)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"{out_dir} is not empty; choose a new directory for the HF checkpoint")
