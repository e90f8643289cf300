"""Device meshes and the logical-axis rules that map model axis names onto them.

The model names axes logically (`embed`, `heads`, `act_batch`, ...); this module alone
knows mesh axes (`data`, `fsdp`, `expert`, `tensor`). Rules are data: a tuple of
`(logical_name, mesh_axes)` pairs, overridable from `MeshConfig.rules`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax.config import ConfigError, MeshConfig
from lmjax.key_paths import path_name

MESH_AXES = ("data", "fsdp", "expert", "tensor")

log = logging.getLogger("lmjax")

# Parameters shard `embed` over fsdp (ZeRO-3 style), heads/mlp/vocab over tensor and the
# experts of an MoE layer over expert; activations (act_*) shard their batch over data, fsdp
# and expert (expert parallelism borrows data-parallel devices: each holds its own tokens).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("layers", ()),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("mlp", ("tensor",)),
    ("expert", ("expert",)),
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_seq", ()),
    ("act_embed", ()),
    ("act_heads", ("tensor",)),
    ("act_kv_heads", ("tensor",)),
    ("act_mlp", ("tensor",)),
    ("act_vocab", ("tensor",)),
)

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("lmjax_sharding", default=None)


def rules_from_config(cfg: MeshConfig) -> dict[str, tuple[str, ...]]:
    """The default rules with `cfg.rules` ("logical=axis[+axis]") applied on top."""
    rules = dict(DEFAULT_RULES)
    for item in cfg.rules:
        name, sep, axes = item.partition("=")
        name = name.strip()
        if not sep or name not in rules:
            raise ConfigError(
                f"mesh.rules entry {item!r}: expected logical=mesh_axis[+mesh_axis] "
                f"with logical one of {sorted(rules)}"
            )
        parts = tuple(a.strip() for a in axes.split("+") if a.strip())
        bad = [a for a in parts if a not in MESH_AXES]
        if bad:
            raise ConfigError(
                f"mesh.rules entry {item!r}: unknown mesh axes {bad}; mesh axes are {MESH_AXES}"
            )
        rules[name] = parts
    return rules


def logical_to_spec(
    axes: Sequence[str | None],
    rules: dict[str, tuple[str, ...]],
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> P:
    """PartitionSpec for an array whose dimensions have logical names `axes`.

    A mesh axis that two dimensions map to is a rule conflict and raises, whatever its size;
    so does a dimension that its mesh axes do not divide (given `shape`). Mesh axes of size
    1 are then dropped from the spec.
    """
    used: dict[str, str | None] = {}
    spec = []
    for dim, name in enumerate(axes):
        mesh_axes = rules.get(name, ()) if name else ()
        for a in mesh_axes:
            if a in used:
                raise ConfigError(
                    f"sharding rule conflict: logical axes {used[a]!r} and {name!r} of "
                    f"{tuple(axes)} both map to mesh axis {a!r}; change mesh.rules"
                )
            used[a] = name
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
        if mesh is not None and shape is not None and mesh_axes:
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape[dim] % size:
                raise ConfigError(
                    f"dimension {name!r} of size {shape[dim]} (array {tuple(axes)} {tuple(shape)}) is "
                    f"not divisible by mesh axes {mesh_axes} of size {size}: change the mesh shape "
                    f"(mesh.*) or map {name!r} elsewhere with mesh.rules"
                )
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return P(*spec)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict[str, tuple[str, ...]]):
    """Within this context, `constrain` pins activations to shardings from `rules`."""
    token = _CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def context_key() -> Any:
    """A hashable summary of the active `activation_sharding` context (or None).

    `constrain` reads that context while tracing, which jit's cache does not see; jitted
    functions take this as a static argument so that calls inside and outside a context
    (or under different meshes or rules) compile separately.
    """
    ctx = _CONTEXT.get()
    if ctx is None:
        return None
    mesh, rules = ctx
    return mesh, tuple(sorted((name, tuple(axes)) for name, axes in rules.items()))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical `axes`; a no-op outside `activation_sharding`."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_spec(axes, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_mesh_axes(name: str) -> dict[str, int]:
    """{mesh axis: size} that logical axis `name` is split over (size > 1, in order) under the
    active `activation_sharding` context; {} outside one."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return {}
    mesh, rules = ctx
    return {a: mesh.shape[a] for a in rules.get(name, ()) if mesh.shape[a] > 1}


def splits_evenly(shape: Sequence[int], axes: Sequence[str | None]) -> bool:
    """Whether each dimension of `shape` divides by the mesh axes its logical name maps to
    under the active `activation_sharding` context (True outside one): what shard_map needs."""
    return all(
        size % math.prod(active_mesh_axes(name).values()) == 0
        for size, name in zip(shape, axes)
        if name
    )


def is_axes(x: Any) -> bool:
    """A logical-axes leaf: a plain tuple of names or None (not a NamedTuple state)."""
    return type(x) is tuple and all(isinstance(e, (str, type(None))) for e in x)


def tree_shardings(
    axes_tree: Any,
    mesh: Mesh,
    rules,
    shapes_tree: Any = None,
    *,
    replicate_indivisible: bool = False,
) -> Any:
    """NamedShardings for a pytree whose leaves are logical-axes tuples (`is_axes`).

    With `shapes_tree`, also checks that the mesh divides every sharded dimension: the error
    names the leaf (e.g. `params/layers/wk`), or, with `replicate_indivisible`, such a leaf
    is replicated instead and named in one warning (offline work on whatever devices exist).
    Rule conflicts always raise.
    """
    if shapes_tree is None:
        return jax.tree.map(
            lambda a: NamedSharding(mesh, logical_to_spec(a, rules, mesh)),
            axes_tree,
            is_leaf=is_axes,
        )
    replicated: list[str] = []

    def one(path, a, s):
        try:
            return NamedSharding(mesh, logical_to_spec(a, rules, mesh, s.shape))
        except ConfigError as e:
            logical_to_spec(a, rules, mesh)  # a rule conflict raises whatever the shape
            if not replicate_indivisible:
                raise ConfigError(f"{path_name(path)}: {e}") from None
            replicated.append(path_name(path))
            return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(one, axes_tree, shapes_tree, is_leaf=is_axes)
    if replicated:
        log.warning(
            "replicated on all %d devices (a dimension does not divide the mesh %s): %s",
            mesh.size,
            dict(mesh.shape),
            ", ".join(replicated),
        )
    return shardings


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "expert", "tensor") mesh over `devices` (default: all devices).

    Each mesh axis is (dcn factor) x (ICI factor). With dcn_data/dcn_fsdp > 1 the mesh is
    hybrid: the dcn factors span slices (multi-slice TPU: devices of several `slice_index`)
    or else processes, and the ICI factors span the devices within one.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    dcn = (cfg.dcn_data, cfg.dcn_fsdp, 1, 1)
    n_dcn = math.prod(dcn)
    ici = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
    if any(d <= 0 for d in dcn) or n % n_dcn:
        raise ConfigError(
            f"mesh.dcn_data={cfg.dcn_data} x mesh.dcn_fsdp={cfg.dcn_fsdp} must be positive "
            f"and divide the {n} devices"
        )
    per_slice = n // n_dcn
    free = [i for i, d in enumerate(ici) if d == -1]
    if len(free) > 1 or any(d == 0 or d < -1 for d in ici):
        raise ConfigError(
            f"mesh (data, fsdp, expert, tensor) = {tuple(ici)}: sizes must be positive, "
            "with at most one -1 to take the remaining devices"
        )
    if free:
        fixed = math.prod(d for d in ici if d != -1)
        if per_slice % fixed:
            raise ConfigError(
                f"mesh (data, fsdp, expert, tensor) = {tuple(ici)}: {fixed} does not divide "
                f"the {per_slice} devices per slice"
            )
        ici[free[0]] = per_slice // fixed
    if math.prod(ici) != per_slice:
        raise ConfigError(
            f"mesh (data, fsdp, expert, tensor) = {tuple(ici)} has {math.prod(ici)} devices but there are "
            f"{per_slice} per slice ({n} devices / {n_dcn} dcn groups): make the product match, "
            "or set one axis to -1"
        )
    shape = tuple(i * d for i, d in zip(ici, dcn))
    if n_dcn > 1:
        grid = _hybrid_grid(ici, dcn, devices)
    elif devices[0].platform == "tpu":
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def offline_mesh(
    cfg: MeshConfig, devices: Sequence[jax.Device] | None = None
) -> tuple[Mesh, dict[str, tuple[str, ...]]]:
    """(mesh, rules) for work outside training (eval, generation, export, conversion): every
    device (default `jax.devices()`: those of every process started, one host's or a pod's)
    on `fsdp`, with `cfg`'s rules.

    A run is often read back on fewer chips than it trained on, so its own mesh shape rarely
    fits; all-fsdp splits every parameter's `embed` dimension over all devices, the least
    memory per device (and so per host) whatever the run's layout.
    """
    devices = list(jax.devices() if devices is None else devices)
    return make_mesh(MeshConfig(rules=cfg.rules), devices), rules_from_config(cfg)


def _hybrid_grid(ici: Sequence[int], dcn: Sequence[int], devices: list) -> np.ndarray:
    """Device array of shape ici * dcn whose dcn factors cross slices (or processes)."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    by_slice = len(slices) > 1
    granules = len(slices) if by_slice else len({d.process_index for d in devices})
    if granules != math.prod(dcn):
        unit = "slices" if by_slice else "processes"
        raise ConfigError(
            f"mesh.dcn_data={dcn[0]} x mesh.dcn_fsdp={dcn[1]} = {math.prod(dcn)} must equal the "
            f"number of {unit} ({granules}): dcn axes span {unit}, the other mesh axes the "
            f"devices within one"
        )
    return mesh_utils.create_hybrid_device_mesh(
        list(ici),
        list(dcn),
        devices=devices,
        process_is_granule=not by_slice,
        allow_split_physical_axes=True,
    )


def batch_sharding(mesh: Mesh, rules: dict[str, tuple[str, ...]]) -> NamedSharding:
    """How a [batch, seq] input batch is laid out: rows split by the `act_batch` rule."""
    return NamedSharding(mesh, logical_to_spec(("act_batch", None), rules, mesh))


def batch_shard_count(batch: NamedSharding) -> int:
    """Number of row blocks a `batch_sharding` splits the batch into."""
    axes = batch.spec[0] if len(batch.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(batch.mesh.shape[a] for a in axes)


def process_rows(batch: NamedSharding, global_rows: int) -> np.ndarray:
    """Global row indices (ascending) that this process's devices hold of a [global_rows, ...]
    batch laid out by `batch`: the rows its data pipeline must produce.

    Whatever the mesh: when a mesh axis that does not split the batch (tensor) spans
    processes, those processes hold (and so feed) the same rows.
    """
    shards = batch_shard_count(batch)
    if global_rows % shards:
        raise ConfigError(
            f"data.batch_size={global_rows} is not divisible by the {shards} batch "
            f"shards of the mesh (act_batch -> {batch.spec[0]}): change "
            f"data.batch_size or the mesh"
        )
    rows: set[int] = set()
    for index in batch.addressable_devices_indices_map((global_rows, 1)).values():
        rows.update(range(global_rows)[index[0]] if index else range(global_rows))
    return np.array(sorted(rows), np.int64)


def check_microbatch(batch: NamedSharding, batch_size: int, grad_accum: int) -> None:
    """Refuses microbatches (`batch_size / grad_accum` rows, globally) that `batch`'s row
    blocks do not divide: under a Pallas attention kernel (`attention._per_device`) every
    device would then run every row of each microbatch, N times the work on N devices."""
    shards, rows = batch_shard_count(batch), batch_size // grad_accum
    if rows % shards:
        raise ConfigError(
            f"a microbatch of data.batch_size / optim.grad_accum = {batch_size} / {grad_accum} "
            f"= {rows} rows does not divide over the mesh's {shards} batch devices: choose "
            f"data.batch_size and optim.grad_accum with batch_size / grad_accum a multiple "
            f"of {shards}"
        )


def shard_map_logical(
    fn: Callable, in_axes: Sequence[Sequence[str | None]], out_axes: Any
) -> Callable:
    """`fn` mapped over shards of the active `activation_sharding` mesh, with each argument
    (and each output: `out_axes` is one logical-axes tuple, or a tuple of them for a tuple of
    outputs) split by its logical axes; `fn` itself outside that context.

    For kernels that XLA cannot partition (Pallas/Mosaic calls) and for explicit collectives
    (`all_to_all_logical`): `fn` sees per-device blocks.
    """
    ctx = _CONTEXT.get()
    if ctx is None:
        return fn
    mesh, rules = ctx
    spec = lambda a: logical_to_spec(a, rules, mesh)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=tuple(spec(a) for a in in_axes),
        out_specs=jax.tree.map(spec, out_axes, is_leaf=is_axes),
        check_vma=False,
    )


def all_to_all_logical(x: jax.Array, name: str, split_axis: int, concat_axis: int) -> jax.Array:
    """Inside `shard_map_logical`: the tiled all-to-all over the mesh axes that logical axis
    `name` maps to (block i of `split_axis` goes to device i, the blocks received are
    concatenated along `concat_axis`); `x` itself when `name` spans no mesh axis."""
    axes = tuple(active_mesh_axes(name))
    if not axes:
        return x
    return jax.lax.all_to_all(
        x, axes[0] if len(axes) == 1 else axes, split_axis, concat_axis, tiled=True
    )


def describe_params(
    param_shapes: Any,
    axes: Any,
    mesh: Mesh,
    rules: dict[str, tuple[str, ...]],
    *,
    replicated_warn_elements: int = 1_000_000,
) -> str:
    """A table of every parameter: shape, logical axes, PartitionSpec and bytes per device.

    param_shapes: pytree of arrays or ShapeDtypeStructs; axes: the same tree of logical-axes
    tuples. Ends with the per-device total and a WARNING line for each parameter of more than
    `replicated_warn_elements` elements that stays fully replicated on a mesh of >1 device.
    """
    leaves = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_axes)[0]
    shapes = jax.tree.leaves(param_shapes)
    rows, warnings, total = [], [], 0
    for (path, names), shaped in zip(leaves, shapes):
        name = path_name(path)
        spec = logical_to_spec(names, rules, mesh, shaped.shape)
        local = NamedSharding(mesh, spec).shard_shape(tuple(shaped.shape))
        nbytes = math.prod(local) * np.dtype(shaped.dtype).itemsize
        total += nbytes
        rows.append(
            (
                name,
                "x".join(map(str, shaped.shape)),
                ",".join(n or "-" for n in names),
                str(tuple(spec)),
                format_bytes(nbytes),
            )
        )
        size = math.prod(shaped.shape)
        if mesh.size > 1 and all(s is None for s in spec) and size > replicated_warn_elements:
            warnings.append(
                f"WARNING: {name} {tuple(shaped.shape)} ({size / 1e6:.1f}M elements) is "
                f"replicated on all {mesh.size} devices: map one of its logical axes "
                f"{tuple(names)} to a mesh axis of size > 1 (mesh.* or mesh.rules)"
            )
    header = ("parameter", "shape", "logical axes", "partition spec", "bytes/device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    lines = [f"mesh {dict(mesh.shape)} over {mesh.size} devices", fmt(header)]
    lines += [fmt(r) for r in rows]
    lines.append(f"parameters per device: {format_bytes(total)}")
    return "\n".join(lines + warnings)


def format_bytes(n: float) -> str:
    """1536 -> "1.50 KiB"; GiB at most."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.2f} {unit}"
    return f"{n / 1024:.2f} GiB"
