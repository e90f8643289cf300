"""Config compatibility: what a checkpoint records about its run, and which changes a resume
or `--init-from` accepts (config fields, tokenizer, optimizer-state layout)."""

from __future__ import annotations

import hashlib
import json
import logging

import jax
import numpy as np
from etils import epath

from lmjax import __version__, config as config_lib
from lmjax.checkpoint.paths import absolute
from lmjax.config import Config, ConfigError
from lmjax.key_paths import path_name
from lmjax.model import transformer

log = logging.getLogger("lmjax")

# Model fields a resume may change: how the step is computed (dtype, remat, attention, matmul,
# scan_layers, logits_chunk, the MoE dispatch mode moe_capacity_factor and its grouped matmul
# moe_matmul), the fresh-init scale
# (init_std) and the length limit (max_seq_len). Every other model field changes the
# parameters' shapes or meaning, and a resume refuses it.
COMPUTE_ONLY_MODEL_FIELDS = (
    "dtype",
    "remat",
    "attention",
    "matmul",
    "scan_layers",
    "max_seq_len",
    "init_std",
    "logits_chunk",
    "moe_capacity_factor",
    "moe_matmul",
)
TOKENIZER_FIELDS = ("data.tokenizer_vocab_size",)
# Data fields the saved data position depends on (the pipeline's identity, `check_state`):
# refused from the checkpoint's metadata before anything is prepared or restored.
DATA_POSITION_FIELDS = (
    "data.source",
    "data.mixture",
    "data.seq_len",
    "data.batch_size",
    "data.packing",
    "data.shuffle",
    "data.seed",
)


class ResumeError(ConfigError):
    """A checkpoint cannot be resumed as asked; the message says what to do instead."""


class StructureMismatch(ResumeError):
    """The saved state's leaves differ from those this config builds (not a damaged file)."""


def config_fingerprint(config: Config) -> str:
    return hashlib.sha256(config_lib.to_json(config).encode()).hexdigest()[:16]


def make_metadata(config: Config, tokenizer_fingerprint: str | None, mesh) -> dict:
    """What a checkpoint records about the run that wrote it (JSON-able)."""
    return {
        "lmjax_version": __version__,
        "config_fingerprint": config_fingerprint(config),
        "config": config_lib.to_dict(config),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "mesh_shape": {k: int(v) for k, v in mesh.shape.items()},
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "param_layout_version": transformer.PARAM_LAYOUT_VERSION,
    }


def refused_fields(changes: dict[str, tuple], accepted: tuple[str, ...] = ()) -> list[str]:
    """The changed fields (from `config.diff`) a resume must refuse: parameter shapes or
    meaning, the tokenizer, and what the data position depends on, except those the user
    `accepted` (`checkpoint.accept_changes`)."""
    return sorted(
        k
        for k in changes
        if k not in accepted
        and (
            (k.startswith("model.") and k[len("model.") :] not in COMPUTE_ONLY_MODEL_FIELDS)
            or k in TOKENIZER_FIELDS
            or k in DATA_POSITION_FIELDS
        )
    )


def check_resumable(meta: dict, config: Config, where: str) -> dict[str, tuple]:
    """Raises ResumeError when `config` cannot continue the run that wrote `meta`; returns the
    allowed changes `{field: (checkpoint value, new value)}`.

    `data.tokenizer` (a path) is not compared: the tokenizer fingerprint is, once loaded.
    """
    layout = meta.get("param_layout_version")
    if layout != transformer.PARAM_LAYOUT_VERSION:
        raise ResumeError(
            f"{where} has parameter layout version {layout}, this lmjax expects "
            f"{transformer.PARAM_LAYOUT_VERSION}: convert it with the lmjax version "
            f"{meta.get('lmjax_version')} that wrote it, or start a new workdir."
        )
    saved = config_lib.from_dict(meta["config"])
    changes = {k: v for k, v in config_lib.diff(saved, config).items() if k != "data.tokenizer"}
    refused = refused_fields(changes, config.checkpoint.accept_changes)
    if refused:
        lines = "\n  ".join(
            f"{k}: checkpoint {changes[k][0]!r}, now {changes[k][1]!r}" for k in refused
        )
        raise ResumeError(
            f"cannot resume {where}: these fields change the model, the tokenizer or the "
            f"data position:\n  {lines}\nFix: resume with the checkpoint's values (--set "
            "FIELD=VALUE), start a new workdir, or load only the params with --init-from "
            "(a batch-size, sequence-length or rope change is accepted with --set "
            "checkpoint.accept_changes=FIELD[,FIELD])."
        )
    return changes


def check_tokenizer(meta: dict, fingerprint: str | None, where: str) -> None:
    saved = meta.get("tokenizer_fingerprint")
    if saved != fingerprint:
        raise ResumeError(
            f"cannot resume {where}: it was trained with tokenizer {saved}, this run "
            f"loads tokenizer {fingerprint}. Fix: set data.tokenizer to the "
            "checkpoint's tokenizer (the workdir's tokenizer.model) or start a new "
            "workdir."
        )


def _leaf_names(path) -> tuple[str, ...]:
    """A key path without positions: the names that say what a leaf is (mu, nu, count, ...),
    so wrappers that hold no state (clipping's EmptyState) do not change it."""
    out = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
    return tuple(out)


def positions(tree) -> list[str]:
    """Each leaf's full key path, positions included."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _signature(tree) -> list[tuple]:
    return [
        (_leaf_names(p), tuple(x.shape), np.dtype(x.dtype).name)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def in_saved_layout(saved, target, item: str):
    """`target`'s leaves (ShapeDtypeStructs) arranged like the saved tree `saved` (orbax
    metadata), for a restore whose leaves are then put back into `target`'s structure.

    Sound when both have the same leaves (names, shapes, dtypes) in the same order, as when
    only stateless wrappers changed (optim.clip_norm turned on or off); raises
    StructureMismatch otherwise.
    """
    have, want = _signature(saved), _signature(target)
    if have != want:
        only_saved = ["/".join(n) + f" {s}" for n, s, _ in have if (n, s, _) not in want][:4]
        only_new = ["/".join(n) + f" {s}" for n, s, _ in want if (n, s, _) not in have][:4]
        raise StructureMismatch(
            f"the saved {item} state has {len(have)} arrays, this config "
            f"builds {len(want)} (only saved: {only_saved or 'none'}; only "
            f"new: {only_new or 'none'})"
        )
    return jax.tree.unflatten(jax.tree.structure(saved), jax.tree.leaves(target))


def model_diff(a, b) -> dict[str, tuple]:
    return config_lib.diff(Config(model=a), Config(model=b))


# Beside an exported params directory: the fingerprint of the tokenizer the params were trained
# with, so `--init-from` can refuse another tokenizer.
TOKENIZER_RECORD = "lmjax_tokenizer.json"


def check_init_tokenizer(init_from: str, fingerprint: str | None) -> None:
    """Refuses `--init-from` params trained with another tokenizer than `fingerprint`; params
    without a record (an HF import) are only warned about."""
    record = epath.Path(absolute(init_from)) / TOKENIZER_RECORD
    if not record.exists():
        log.warning(
            "--init-from %s records no tokenizer (an HF import?): make sure "
            "data.tokenizer is the one its params were trained with",
            init_from,
        )
        return
    saved = json.loads(record.read_text()).get("tokenizer_fingerprint")
    if saved != fingerprint:
        raise ResumeError(
            f"--init-from {init_from}: its params were trained with tokenizer "
            f"{saved}, this run loads tokenizer {fingerprint}. Fix: set "
            "data.tokenizer to the tokenizer of the run it was exported from."
        )
