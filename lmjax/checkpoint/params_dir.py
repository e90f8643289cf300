"""Params-only directories: `PATH/params` (an orbax checkpoint of the params) and
`PATH/model_config.json`. `lmjax checkpoint export --params-only` and `lmjax convert from-hf`
write them; `--init-from`, `lmjax convert to-hf`, eval and generation read them."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

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
    mesh, rules = sharding.offline_mesh(mesh_cfg or MeshConfig())
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
    if (directory / "params").exists() or (directory / "model_config.json").exists():
        raise ConfigError(
            f"{directory} already holds a converted checkpoint; choose a new directory"
        )
