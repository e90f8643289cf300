"""Params-only directories: `PATH/params` (an orbax checkpoint of the params) and
`PATH/model_config.json`. `lmjax checkpoint export --params-only` and `lmjax convert from-hf`
write them; `--init-from`, `lmjax convert to-hf`, eval and generation read them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from lmjax import storage
from lmjax.config import ConfigError, MeshConfig, ModelConfig
from lmjax.model import transformer
from lmjax.parallel import distributed, sharding


def save(cfg: ModelConfig, params: Any, path: str | os.PathLike) -> None:
    """Writes `path/model_config.json` and an orbax checkpoint of `params` at `path/params`.

    Collective when several processes are started: every process calls it with the same
    arguments and writes its own shards of `params` (host memory: its share of the model);
    process 0 writes the metadata and, once the params are committed, model_config.json.
    """
    directory = storage.path(path)
    require_new(directory)
    transformer.check_param_shapes(cfg, params)
    distributed.barrier("lmjax_params_dir_checked")  # no process writes before all checked
    if distributed.is_primary():
        directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params)
        ckptr.wait_until_finished()
    if distributed.is_primary():
        config = json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
        (directory / "model_config.json").write_text(config + "\n")
    distributed.barrier("lmjax_params_dir_saved")


def save_streamed(
    cfg: ModelConfig, pieces: Iterable[tuple[tuple[str, ...], Any, np.ndarray]], path: Any
) -> None:
    """Writes what `save` writes, from `pieces` consumed one at a time: (leaf path, index into
    the leaf or None for all of it, numpy array). Host memory: one piece and tensorstore's
    buffers, never the model.

    Each leaf is a zarr array of the orbax layout that `save` writes for numpy leaves
    without OCDBT (`path/params/<a.b>/`, named in `params/_METADATA`), which `load` restores
    like any orbax checkpoint; a stacked leaf is chunked by the first piece's index (one
    layer's slice, or one expert's), so that each piece is written alone. model_config.json
    is written last: an interrupted conversion is never taken for a complete one.
    """
    from orbax.checkpoint._src.serialization import tensorstore_utils  # orbax's own spec

    path = storage.path(path)
    require_new(path)
    shapes = dict(_flat(transformer.param_shapes(cfg)))
    arrays: dict[tuple[str, ...], Any] = {}
    written = dict.fromkeys(shapes, 0)
    for keys, index, value in pieces:
        shape = shapes[keys].shape
        if keys not in arrays:
            chunks = [1] * len(index or ()) + list(shape[len(index or ()) :])
            spec = tensorstore_utils.build_kvstore_tspec(
                str(path / "params"), ".".join(keys), use_ocdbt=False
            )
            arrays[keys] = ts.open(
                {"driver": "zarr", "kvstore": spec, "metadata": _ZARR | {"chunks": chunks}},
                create=True,
                dtype=ts.dtype(shapes[keys].dtype.name),
                shape=shape,
            ).result()
        target = arrays[keys][index] if index is not None else arrays[keys]
        target.write(value).result()
        written[keys] += value.size
    unwritten = [".".join(k) for k, n in written.items() if n != math.prod(shapes[k].shape)]
    if unwritten:
        raise ValueError(f"params {unwritten} were not written whole")
    (path / "params" / "_METADATA").write_text(json.dumps(_tree_metadata(shapes)))
    # orbax's commit marker, which it requires on filesystems without atomic renames (gs://)
    (path / "params" / "commit_success.txt").write_text(
        f"Checkpoint commit was successful to {path / 'params'}"
    )
    config = json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)
    (path / "model_config.json").write_text(config + "\n")


# How orbax stores a numpy leaf without OCDBT (zarr v2, zstd level 1), and its tree record.
_ZARR = {"compressor": {"id": "zstd", "level": 1}}


def _tree_metadata(shapes: dict[tuple[str, ...], Any]) -> dict:
    leaf = {"value_type": "np.ndarray", "skip_deserialize": False}
    tree = {
        str(keys): {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": leaf,
        }
        for keys in shapes
    }
    return {
        "tree_metadata": tree,
        "use_ocdbt": False,
        "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": None,
    }


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a directory written by `save` (read before any slow work); a
    ConfigError when `path` is not one."""
    directory = storage.path(path)
    config_file = directory / "model_config.json"
    if not config_file.exists() or not (directory / "params").exists():
        raise ConfigError(
            f"{directory} is not an lmjax params directory: expected model_config.json "
            "and params/ (as written by `lmjax convert from-hf` or `lmjax checkpoint "
            "export --params-only`)"
        )
    data = json.loads(config_file.read_text())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(data) - known:
        raise ConfigError(
            f"{config_file} has unknown keys {sorted(set(data) - known)}: "
            "written by another lmjax version?"
        )
    return ModelConfig(**data)


def offline_target(cfg: ModelConfig, mesh_cfg: MeshConfig | None = None) -> Any:
    """ShapeDtypeStructs of `cfg`'s params, each sharded over all devices (every process's) as
    `sharding.offline_mesh` lays them out (a leaf whose dimensions the mesh does not divide
    is replicated): what offline commands restore onto, so that no device holds the model.
    mesh_cfg: the run's (its rules apply); default the default rules."""
    return sharded_shapes(cfg, *sharding.offline_mesh(mesh_cfg or MeshConfig()))


def sharded_shapes(cfg: ModelConfig, mesh: Any, rules: Any) -> Any:
    """ShapeDtypeStructs of `cfg`'s params laid out on `mesh` by `rules`; a leaf whose
    dimensions the mesh does not divide is replicated."""
    shapes = transformer.param_shapes(cfg)
    shardings = sharding.tree_shardings(
        transformer.param_axes(cfg), mesh, rules, shapes, replicate_indivisible=True
    )
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def load(path: str | os.PathLike, target: Any = None) -> tuple[ModelConfig, Any]:
    """Reads a directory written by `save`: (ModelConfig, params as jax arrays).

    target: ShapeDtypeStructs with shardings to restore onto (training's, for `--init-from`);
    by default `offline_target` of the directory's config. Each process reads only its shards.
    """
    cfg = read_config(path)
    target = offline_target(cfg) if target is None else target
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(storage.path(path) / "params", target)
    return cfg, params


def require_new(path: str | os.PathLike) -> None:
    """A ConfigError unless `path` holds no params directory yet (checked before slow reads)."""
    directory = storage.path(path)
    if (directory / "model_config.json").exists():
        raise ConfigError(
            f"{directory} already holds a converted checkpoint; choose a new directory"
        )
    if (directory / "params").exists():  # model_config.json is written last
        raise ConfigError(
            f"{directory} holds an interrupted conversion or export (params/ without "
            "model_config.json): delete it or choose a new directory"
        )
