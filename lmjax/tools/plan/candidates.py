"""The candidate space of `lmjax plan`: the product of a few dimensions (`DEFAULT_SPACE`, each
replaceable with `--sweep KEY=V1,V2`, which also adds any other config field as one), each
point either a Candidate to compile or Rejected before any compile with the reason (a mesh
that does not divide the chips, a shape the mesh axes do not divide)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

import jax

from lmjax.config import Config, ConfigError
from lmjax.config_checks import validate
from lmjax.config_overrides import apply_overrides, parse_sweep
from lmjax.key_paths import path_name
from lmjax.model import transformer
from lmjax.parallel import sharding

# rows_per_chip: sequences per chip (global batch = rows_per_chip x all chips, as MaxText's
# per_device_batch_size). "-" in mesh.dcn_data means: all slices data-parallel.
DEFAULT_SPACE: dict[str, tuple[str, ...]] = {
    "mesh.data": ("1",),
    "mesh.expert": ("1",),  # MoE models: e.g. --sweep mesh.expert=1,8
    "mesh.tensor": ("1", "2"),
    "mesh.dcn_data": ("-",),
    "rows_per_chip": ("1", "2", "4"),
    "model.remat": ("full", "save_dots"),
    "optim.grad_accum": ("1",),
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    overrides: tuple[str, ...]  # the --set line that makes this candidate from the experiment
    config: Config


@dataclasses.dataclass(frozen=True)
class Rejected:
    overrides: tuple[str, ...]
    reason: str


def parse_sweeps(sweeps: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """["model.remat=full,none"] -> DEFAULT_SPACE with that dimension replaced."""
    return {**DEFAULT_SPACE, **dict(map(parse_sweep, sweeps))}


def _sharding_problem(config: Config, mesh_sizes: dict[str, int], rows: int) -> str | None:
    """The first parameter dimension (or the batch of `rows`) that the mesh axes its logical
    axis maps to (under the config's rules) do not divide; None when all divide."""
    rules = sharding.rules_from_config(config.mesh)
    leaves = jax.tree_util.tree_flatten_with_path(
        transformer.param_specs(config.model),
        is_leaf=lambda x: isinstance(x, transformer.ParamSpec),
    )[0]
    named = [("params/" + path_name(path), v) for path, v in leaves]
    named.append(("batch", transformer.ParamSpec((rows,), ("act_batch",), "")))
    for name, spec in named:
        for size, axis in zip(spec.shape, spec.axes):
            mesh_axes = rules.get(axis, ())
            n = math.prod(mesh_sizes[a] for a in mesh_axes)
            if size % n:
                return (
                    f"{name} dimension {axis!r} of size {size} is not divisible by mesh "
                    f"axes {'+'.join(mesh_axes)} of size {n}"
                )
    return None


def _ici(point: dict[str, str]) -> tuple[int, int, int]:
    """(data, expert, tensor) of a point; fsdp takes the chips they leave."""
    return int(point["mesh.data"]), int(point.get("mesh.expert", "1")), int(point["mesh.tensor"])


def _mesh_problem(config: Config, chips: int, slices: int, point: dict[str, str]) -> str | None:
    """Why the mesh of `point` cannot hold `config` (None when it can)."""
    data, expert, tensor = _ici(point)
    dcn_data = slices if point["mesh.dcn_data"] == "-" else int(point["mesh.dcn_data"])
    if data < 1 or expert < 1 or tensor < 1 or chips % (data * expert * tensor):
        named = f"mesh.data x mesh.tensor = {data} x {tensor}"
        if expert != 1:
            named = f"mesh.data x mesh.expert x mesh.tensor = {data} x {expert} x {tensor}"
        return f"{named} does not divide {chips} chips per slice"
    if dcn_data < 1 or slices % dcn_data:
        return f"mesh.dcn_data={dcn_data} does not divide {slices} slices"
    accum = int(point["optim.grad_accum"])
    rows = int(point["rows_per_chip"]) * chips * slices
    if accum < 1 or rows % accum:
        return f"optim.grad_accum={accum} does not divide the batch of {rows} rows"
    sizes = {
        "data": data * dcn_data,
        "fsdp": chips // (data * expert * tensor) * (slices // dcn_data),
        "expert": expert,
        "tensor": tensor,
    }
    return _sharding_problem(config, sizes, rows // accum)


def _overrides(chips: int, slices: int, point: dict[str, str]) -> tuple[str, ...]:
    """The --set items of one point of the space (mesh and batch made explicit)."""
    data, expert, tensor = _ici(point)
    dcn_data = slices if point["mesh.dcn_data"] == "-" else int(point["mesh.dcn_data"])
    ici = data * expert * tensor
    fsdp = chips // ici if ici and chips % ici == 0 else -1
    items = [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"]
    if expert != 1:
        items.append(f"mesh.expert={expert}")
    if slices > 1:
        items += [f"mesh.dcn_data={dcn_data}", f"mesh.dcn_fsdp={slices // dcn_data}"]
    items.append(f"data.batch_size={int(point['rows_per_chip']) * chips * slices}")
    special = ("mesh.data", "mesh.expert", "mesh.tensor", "mesh.dcn_data", "rows_per_chip")
    items += [f"{k}={v}" for k, v in point.items() if k not in special]
    return tuple(items)


def enumerate_candidates(
    config: Config, chips: int, slices: int, space: dict[str, tuple[str, ...]]
) -> tuple[list[Candidate], list[Rejected]]:
    """Every point of `space` for `slices` slices of `chips` chips: the ones to compile, and
    the ones the shapes rule out (with the reason). Bad keys or values raise a ConfigError."""
    keys = list(space)
    candidates, rejected = [], []
    for values in itertools.product(*(space[k] for k in keys)):
        point = dict(zip(keys, values))
        try:
            problem = _mesh_problem(config, chips, slices, point)
        except ValueError:
            raise ConfigError(
                f"--sweep: {point} has a non-integer where a count is expected "
                "(mesh.*, rows_per_chip, optim.grad_accum)"
            ) from None
        overrides = _overrides(chips, slices, point)
        if problem:
            rejected.append(Rejected(overrides, problem))
            continue
        try:
            candidates.append(
                Candidate(overrides, validate(apply_overrides(config, list(overrides))))
            )
        except ConfigError as e:
            raise ConfigError(f"--sweep: {e}") from None
    return candidates, rejected
