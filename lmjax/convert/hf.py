"""Hugging Face checkpoints (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3) <-> lmjax
parameters: the shared core (config keys, safetensors files, load and save) that walks one
family's name-and-transform table (lmjax/convert/families.py).

Each table entry pairs an HF tensor name with an lmjax parameter path and says how the
array moves between them; `load` and `save` both walk it. HF `nn.Linear` weights are
`[out, in]`; lmjax keeps `[in, out]` with the heads split out (wq `[embed, heads,
head_dim]`, wo `[heads, head_dim, embed]`) and the layers stacked on a leading axis.
lmjax applies RoPE in HF's rotate-half form, so q/k need no permutation.

Only safetensors are read: PyTorch `.bin`/`.pt` files are pickles, which can run code when
loaded, and are refused with instructions to convert them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import typing
from typing import Any, Iterator

import ml_dtypes  # noqa: F401  (registers np.dtype("bfloat16"))
import numpy as np
from etils import epath

from lmjax import storage
from lmjax.config import ConfigError, ModelConfig
from lmjax.convert import families
from lmjax.convert.families import Entry, Family
from lmjax.model import transformer
from lmjax.parallel import distributed

Params = dict[str, Any]


# HF config.json key <-> ModelConfig field (every family), and the keys of a "llama3"
# rope_scaling block.
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


def _entries(cfg: ModelConfig, family: Family | None = None):
    """Yields (entry, hf_name, index into the lmjax array or None, lmjax shape there) for
    `cfg`, from `family`'s table (default: the family of `cfg`'s switches): the index of a
    stacked parameter is (its row,) or, for an expert weight, (row, expert)."""
    specs = transformer.param_specs(cfg)
    is_moe = transformer.layer_is_moe(cfg)
    layers_of = {
        "layers": list(range(cfg.n_layers)),
        "moe": [i for i, m in enumerate(is_moe) if m],
        "dense_mlp": [i for i, m in enumerate(is_moe) if not m],
    }
    for entry in (family or families.of_config(cfg)).table:
        node: Any = specs
        for key in entry.path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:  # e.g. unembed of a tied model
            continue
        if entry.path[0] not in layers_of:
            yield entry, entry.hf, None, node.shape
            continue
        for row, i in enumerate(layers_of[entry.path[0]]):
            if "{j}" not in entry.hf:
                yield entry, entry.hf.format(i=i), (row,), node.shape[1:]
                continue
            for j in range(cfg.moe_experts):
                yield entry, entry.hf.format(i=i, j=j), (row, j), node.shape[2:]


# ---------------------------------------------------------------- config


def _check_family(hf: dict, family: Family) -> None:
    """A ConfigError unless `hf` describes a model of `family` that lmjax implements."""
    for key, ok, what in family.required:
        if hf.get(key, ok) != ok:
            raise ConfigError(
                f"config.json has {key}={hf[key]!r}; lmjax's {family.model_type} uses {what}"
            )
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
        raise ConfigError(
            f"config.json lacks {missing}: is this a {family.model_type} config.json?"
        )


def _rope_fields(rope: dict) -> dict[str, Any]:
    """The ModelConfig rope-scaling fields of an HF rope_scaling (or rope_parameters) block."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type == "linear":
        return {"rope_scaling_type": "linear", "rope_scaling_factor": float(rope["factor"])}
    if rope_type != "llama3":
        raise ConfigError(
            f"config.json uses rope_type={rope_type!r}; lmjax implements plain RoPE, "
            'linear scaling and Llama-3.1 ("llama3") scaling only'
        )
    absent = [k for k, _ in ROPE_SCALING_KEYS if k not in rope]
    if absent:
        raise ConfigError(f"config.json rope_scaling of type llama3 lacks {absent}")
    return {field: _FIELD_TYPES[field](rope[key]) for key, field in ROPE_SCALING_KEYS}


def config_from_hf(hf: dict, *, param_dtype: str = "float32") -> ModelConfig:
    """A ModelConfig from an HF `config.json` dict of any family in `families.FAMILIES`;
    unsupported features are errors."""
    family = families.by_model_type(hf.get("model_type"))
    _check_family(hf, family)
    # transformers >= 5 writes rope settings as "rope_parameters"; older files as
    # "rope_theta" plus "rope_scaling".
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if "full_attention" in rope:  # per layer kind (transformers >= 5, Gemma 3)
        local = rope.get("sliding_attention", {})
        rope = {**rope["full_attention"], "rope_local_base_freq": local.get("rope_theta")}
    values = {
        "num_key_value_heads": hf["num_attention_heads"],
        "head_dim": hf["hidden_size"] // hf["num_attention_heads"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "initializer_range": ModelConfig.init_std,
        **dict(family.defaults),
    }
    values.update({k: v for k, v in hf.items() if v is not None})
    if rope.get("rope_local_base_freq") is not None:
        values["rope_local_base_freq"] = rope["rope_local_base_freq"]
    fields = {field: _FIELD_TYPES[field](values[key]) for key, field in CONFIG_KEYS}
    for key, field in family.keys:  # present and null: off
        value = None if key in hf and hf[key] is None else values.get(key)
        fields[field] = _FIELD_TYPES[field](value or 0)
    fields.update(family.switches)
    if family.router_key:
        renorm = bool(values.get(family.router_key, False))
        fields["moe_router"] = "softmax_topk_renorm" if renorm else "softmax_topk"
    fields.update(_rope_fields(rope))
    cfg = ModelConfig(**fields, param_dtype=param_dtype)
    _check_shapes(cfg, hf)
    return cfg


def _check_shapes(cfg: ModelConfig, hf: dict) -> None:
    """A ConfigError unless the heads group evenly and the local/global layer pattern of
    `hf` ("layer_types") is the one lmjax derives (`transformer.layer_is_local`)."""
    if cfg.n_heads % cfg.n_kv_heads or cfg.head_dim % 2:
        raise ConfigError(
            f"config.json has {cfg.n_heads} attention heads, {cfg.n_kv_heads} "
            f"key/value heads and head_dim {cfg.head_dim}: heads must be a "
            "multiple of key/value heads and head_dim even"
        )
    types = hf.get("layer_types")
    if types is not None and [t == "sliding_attention" for t in types] != list(
        transformer.layer_is_local(cfg)
    ):
        raise ConfigError(
            f"config.json has layer_types={types}, but lmjax places global layers at every "
            f"global_every-th layer (here {transformer.layer_is_local(cfg)} local): this "
            "pattern cannot be converted"
        )


def config_to_hf(cfg: ModelConfig, torch_dtype: str) -> dict:
    """The `config.json` of `cfg`'s family (`families.of_config`)."""
    family = families.of_config(cfg)
    hf: dict[str, Any] = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        **{key: ok for key, ok, _ in family.required},
    }
    hf.update({key: getattr(cfg, field) for key, field in CONFIG_KEYS})
    hf.update({key: getattr(cfg, field) or None for key, field in family.keys})
    if family.router_key:
        hf[family.router_key] = cfg.moe_router == "softmax_topk_renorm"
    if "query_pre_attn_scalar" in hf:
        hf["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar or cfg.head_dim
    if cfg.sliding_window > 0:
        hf["layer_types"] = [
            "sliding_attention" if local else "full_attention"
            for local in transformer.layer_is_local(cfg)
        ]
    hf["rope_scaling"] = None
    if cfg.rope_scaling_factor > 0 and cfg.rope_scaling_type == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling_factor > 0:
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            **{key: getattr(cfg, field) for key, field in ROPE_SCALING_KEYS},
        }
    hf["torch_dtype"] = torch_dtype
    return hf


# ---------------------------------------------------------------- safetensors files


def _tensor_files(hf_dir: epath.Path) -> dict[str, epath.Path]:
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
    return {name: shard for shard in shards for name in _tensor_names(shard)}


def _tensor_names(shard: epath.Path) -> list[str]:
    """The tensor names in a safetensors file's header (8 bytes of little-endian length, then
    that many bytes of JSON), read without fetching the tensors."""
    with shard.open("rb") as f:
        (length,) = np.frombuffer(f.read(8), "<u8")
        header = json.loads(f.read(int(length)))
    return [name for name in header if name != "__metadata__"]


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = storage.path(hf_dir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory: config.json is missing")
    return json.loads(path.read_text())


def load(hf_dir: str | os.PathLike, *, param_dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Reads an HF directory of any family in `families.FAMILIES` (config.json +
    safetensors, single or sharded) into memory.

    Returns (ModelConfig, params) with params as host numpy arrays in `param_dtype`, shaped
    as `lmjax.model.transformer.param_shapes`. bfloat16/float16 checkpoints are upcast exactly.
    """
    cfg, pieces = read(hf_dir, param_dtype=param_dtype)
    params = _map_tree(lambda s: np.empty(s.shape, s.dtype), transformer.param_shapes(cfg))
    for path, index, array in pieces:
        _get(params, path)[index if index is not None else ...] = array
    return cfg, params


def read(
    hf_dir: str | os.PathLike, *, param_dtype: str = "float32"
) -> tuple[ModelConfig, Iterator[tuple[tuple[str, ...], tuple[int, ...] | None, np.ndarray]]]:
    """(ModelConfig, the params one HF tensor at a time): `load` without holding the model.

    The config and the tensor names are checked first (before anything is read); the
    iterator then yields (lmjax parameter path, index into it or None, array in `param_dtype`
    and lmjax layout), each read alone from its safetensors file.
    """
    hf_dir = storage.path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    cfg = config_from_hf(hf_config, param_dtype=param_dtype)
    family = families.by_model_type(hf_config["model_type"])
    files = _tensor_files(hf_dir)
    wanted = {name for _, name, _, _ in _entries(cfg, family)}
    missing = sorted(wanted - set(files))
    if missing:
        raise ConfigError(
            f"{hf_dir} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f" that a {family.model_type} with this config.json needs"
        )
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unknown = sorted(
        n for n in set(files) - wanted - ignorable if not n.endswith(_IGNORED_SUFFIXES)
    )
    if unknown:
        raise ConfigError(
            f"{hf_dir} has tensors lmjax's {family.model_type} does not use: {unknown[:5]}; "
            f"biases or extra modules mean this is not a plain {family.model_type}"
        )
    return cfg, _pieces(cfg, family, {n: files[n] for n in wanted}, np.dtype(param_dtype))


def _pieces(cfg: ModelConfig, family: Family, files: dict, dtype: np.dtype):
    """`read`'s iterator. Each tensor is read from a file opened for it alone: safetensors
    maps the whole file, and the pages a read touched would otherwise stay in this process's
    memory until the end (the whole model, by then)."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        local = {  # a gs:// shard is read from a local copy (safetensors maps files)
            p: stack.enter_context(storage.local_copy(p)) for p in sorted(set(files.values()))
        }
        for entry, name, index, shape in _entries(cfg, family):
            with safe_open(local[files[name]], framework="np") as f:
                array = f.get_tensor(name)
            if tuple(array.shape) != entry.hf_shape(shape):
                raise ConfigError(
                    f"{name} has shape {tuple(array.shape)} but config.json implies "
                    f"{entry.hf_shape(shape)}"
                )
            yield entry.path, index, entry.to_lmjax(array, shape).astype(dtype, copy=False)


def _shard_layout(
    cfg: ModelConfig, itemsize: int, max_shard_bytes: int
) -> tuple[list[list[tuple[Entry, str, tuple[int, ...] | None]]], int]:
    """([shard: [(table entry, HF name, index or None)]], total bytes): tensors in table
    order, a new shard whenever the next tensor would take one past `max_shard_bytes`."""
    shards: list[list[tuple[Entry, str, tuple[int, ...] | None]]] = [[]]
    size = total = 0
    for entry, name, index, shape in _entries(cfg):
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((entry, name, index))
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
    """Writes an HF directory of `cfg`'s family (`families.of_config`), which that family's
    `...ForCausalLM.from_pretrained` loads.

    Args:
      cfg: the model's config.
      params: numpy or jax arrays, sharded or not: each tensor (a layer's slice for stacked
        layers) is copied to the host alone, gathered from every process when several hold
        its shards (every process then calls `save` alike; process 0 alone writes). Host
        memory stays about one file of `max_shard_bytes` on process 0, one tensor elsewhere.
      out_dir: a new or empty directory.
      dtype: "float32", "bfloat16" or "float16" for the written tensors; None keeps the
        params' dtype.
      max_shard_bytes: above this total size the tensors are split into
        `model-0000k-of-0000n.safetensors` files with a `model.safetensors.index.json`.
    """
    require_empty(out_dir)
    out = storage.path(out_dir)
    transformer.check_param_shapes(cfg, params)
    dtype = dtype or str(params["embed"].dtype)
    if dtype not in _TORCH_DTYPES:
        raise ConfigError(f"cannot write dtype {dtype!r}; choose one of {sorted(_TORCH_DTYPES)}")
    # The shards are laid out from shapes alone, then converted one shard at a time.
    shards, total = _shard_layout(cfg, np.dtype(dtype).itemsize, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    )
    distributed.barrier("lmjax_hf_checked")  # no process writes before all checked
    primary = distributed.is_primary()
    if primary:
        out.mkdir(parents=True, exist_ok=True)
    for filename, shard in zip(names, shards):
        _write_shard(params, shard, out / filename, np.dtype(dtype), write=primary)
    if primary and len(shards) > 1:
        weight_map = {name: f for f, shard in zip(names, shards) for _, name, _ in shard}
        shard_index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(shard_index, indent=2) + "\n")
    if primary:
        hf_config = config_to_hf(cfg, dtype)
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    distributed.barrier("lmjax_hf_saved")


def _write_shard(params: Params, shard, path: epath.Path, dtype: np.dtype, write: bool) -> None:
    """One safetensors file of `shard`'s tensors in `dtype`; with `write` False the tensors
    are still gathered (every process takes part in each gather) but dropped at once."""
    from safetensors.numpy import save_file

    tensors = {}
    for entry, name, index in shard:
        tensor = _hf_tensor(params, entry, index)
        if write:
            tensors[name] = np.ascontiguousarray(tensor.astype(dtype))
    if write:  # transformers requires the "format" header field
        with storage.staged(path) as local:
            save_file(tensors, local, metadata={"format": "pt"})


def _hf_tensor(params: Params, entry: Entry, index: tuple[int, ...] | None) -> np.ndarray:
    """The HF tensor of `entry` (a layer's or a layer's expert's slice of a stack: `index`),
    copied to the host (gathered from every process that holds a part of it)."""
    array = _get(params, entry.path)
    return entry.to_hf(distributed.host_copy(array[index] if index is not None else array))


def to_hf_tensors(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """HF name -> tensor for `params` (any pytree of arrays shaped as the params, e.g.
    their gradients), in memory; `save` writes the same tensors shard by shard."""
    return {name: _hf_tensor(params, entry, index) for entry, name, index, _ in _entries(cfg)}


# ---------------------------------------------------------------- helpers


def _get(tree: Params, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _map_tree(fn, tree):
    return {k: _map_tree(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def require_empty(out_dir: str | os.PathLike) -> None:
    """A ConfigError unless `out_dir` is new or empty (checked before slow reads)."""
    out = storage.path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; choose a new directory for the HF checkpoint")
