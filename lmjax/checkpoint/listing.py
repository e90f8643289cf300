"""Reading checkpoints outside training: list them, load their params (eval, generation) and
export params-only directories (`--init-from`, HF export)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from etils import epath

from lmjax import config as config_lib, storage
from lmjax.checkpoint import params_dir
from lmjax.checkpoint.checkpointer import (
    Checkpointer,
    ReadOnly,
    TornCheckpoint,
    classify,
    damage_evidence,
    retrying,
    steps_in,
)
from lmjax.checkpoint.compat import TOKENIZER_RECORD, ResumeError
from lmjax.checkpoint.paths import ITEMS, absolute, checkpoint_dir
from lmjax.config import Config, ConfigError
from lmjax.errors import FaultError
from lmjax.parallel import distributed
from lmjax.workdir_names import TOKENIZER

log = logging.getLogger("lmjax")


def load_params(workdir: str, step: int | None = None) -> tuple[Config, Any, str]:
    """(Config, params, tokenizer path) of a checkpoint: `step`, or the newest readable one
    (damaged steps are logged and skipped). The params are sharded over all devices, every
    process holding its shards (`params_dir.offline_target`). The tokenizer path is the
    workdir's tokenizer.model when it exists (the run trained it), else data.tokenizer."""
    _, meta, params = _load_params(workdir, step)
    config = config_lib.from_dict(meta["config"])
    local = os.path.join(workdir, TOKENIZER)
    tokenizer_path = local if storage.path(local).exists() else config.data.tokenizer
    return config, params, tokenizer_path


def _load_params(workdir: str, step: int | None) -> tuple[int, dict, Any]:
    """(step, metadata, params) of `step` or of the newest readable step."""
    directory = checkpoint_dir(workdir)
    steps = steps_in(directory)
    if not steps:
        raise ResumeError(f"{workdir} has no committed checkpoints in {directory}.")
    if step is not None and step not in steps:
        raise ResumeError(f"{directory} has no step {step}; it has {steps}.")
    tried = []
    with ReadOnly(directory) as ckpt:
        for s in [step] if step is not None else sorted(steps, reverse=True):
            try:
                return (s, *_read_params(ckpt, s))
            except (ConfigError, FaultError):
                raise
            except Exception as e:  # damage: the previous step is tried
                if classify(e) != "damage":
                    raise
                tried.append(f"step {s}: {str(e).splitlines()[0][:200]}")
                log.error("checkpoint %s step %d is unreadable (%s)", directory, s, tried[-1])
    raise ResumeError(f"no checkpoint of {workdir} is readable ({'; '.join(tried)}).")


def _read_params(ckpt: Checkpointer, step: int) -> tuple[dict, Any]:
    evidence = damage_evidence(os.path.join(ckpt.directory, str(step)))
    if evidence:
        raise TornCheckpoint(evidence)
    where = f"reading {ckpt.directory} step {step}"
    meta = retrying(where, lambda: ckpt.read_json(step, "meta"))
    config = config_lib.from_dict(meta["config"])
    target = params_dir.offline_target(config.model, config.mesh)
    return meta, retrying(where, lambda: ckpt.restore_params(step, target))


def export_params(workdir: str, step: int | None, out: str) -> str:
    """Writes `out/params` + `out/model_config.json` (what `--init-from`, eval, generation and
    HF export read) and `out/TOKENIZER_RECORD` from a checkpoint of `workdir`; returns a
    one-line summary. Started as several processes, each restores and writes its own shards
    (`params_dir.save`); process 0 writes the records."""
    params_dir.require_new(out)  # before the slow read
    step, meta, params = _load_params(workdir, step)
    params_dir.save(config_lib.from_dict(meta["config"]).model, params, out)
    if distributed.is_primary():
        record = {
            "tokenizer_fingerprint": meta.get("tokenizer_fingerprint"),
            "workdir": workdir,
            "step": step,
        }
        (epath.Path(absolute(out)) / TOKENIZER_RECORD).write_text(json.dumps(record))
    return f"wrote params of {workdir} step {step} to {out}"


def _dir_size(path) -> int:
    """Bytes under `path` (an epath; recursion by listing, which also works on GCS)."""
    return sum(_dir_size(p) if p.is_dir() else p.stat().length for p in path.iterdir())


def list_checkpoints(workdir: str) -> list[dict]:
    """One row per step directory (committed or not): step, bytes, complete, metadata."""
    root = epath.Path(checkpoint_dir(workdir))
    if not root.exists():
        return []
    committed = set(steps_in(str(root)))
    rows = []
    with ReadOnly(str(root)) as ckpt:
        for p in sorted(root.iterdir(), key=lambda q: q.name):
            if not p.is_dir():
                continue
            step_text = p.name.split(".")[0]
            if not step_text.isdigit():
                continue
            step = int(step_text)
            row = {
                "step": step,
                "path": str(p),
                "bytes": _dir_size(p),
                "complete": False,
                "problem": "not committed (a save in progress or torn)",
            }
            if step in committed and p.name == str(step):
                missing = [i for i in ITEMS if not (p / i).exists()]
                try:
                    meta = ckpt.read_json(step, "meta") if not missing else None
                    row.update(
                        complete=not missing, problem=f"missing {missing}" if missing else ""
                    )
                    if meta:
                        row.update(
                            {
                                k: meta.get(k)
                                for k in (
                                    "lmjax_version",
                                    "config_fingerprint",
                                    "tokenizer_fingerprint",
                                    "mesh_shape",
                                    "process_count",
                                    "device_count",
                                    "saved_at",
                                )
                            }
                        )
                except Exception as e:  # reported in the table
                    row["problem"] = f"metadata unreadable: {str(e).splitlines()[0][:120]}"
            rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def format_listing(rows: list[dict]) -> str:
    if not rows:
        return "no checkpoints"
    lines = [f"{'step':>8} {'size':>10} {'complete':>8}  details"]
    for r in rows:
        size = f"{r['bytes'] / 2**20:.2f}MiB"
        if r["complete"]:
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.get("saved_at") or 0))
            detail = (
                f"saved {saved} config {r['config_fingerprint']} tokenizer "
                f"{r['tokenizer_fingerprint']} mesh {r['mesh_shape']} processes "
                f"{r['process_count']} devices {r['device_count']} lmjax "
                f"{r['lmjax_version']}"
            )
        else:
            detail = r["problem"]
        lines.append(f"{r['step']:>8} {size:>10} {str(r['complete']).lower():>8}  {detail}")
    return "\n".join(lines)


def json_summary(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, default=str)
