"""Checkpoints: the whole train state saved asynchronously with orbax, the rules for resuming,
and stopping cleanly on preemption.

A checkpoint is one orbax step directory `WORKDIR/checkpoints/STEP/`, committed atomically
(written under a temporary name, renamed, or marked by `commit_success.txt` on GCS):

  params/  the model parameters (the same orbax format as an exported params directory)
  train/   {step, opt_state, rng}: the rest of the TrainState
  data/    the data pipeline's position, `pipeline.state(step)` (JSON)
  meta/    lmjax version, full config and its fingerprint, tokenizer fingerprint, mesh shape,
           process and device counts, model.PARAM_LAYOUT_VERSION (JSON)

Every process writes its own shards; restoring passes the current mesh's shardings, so a
checkpoint restores onto another mesh or device count.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import config as config_lib
from lmjax.config import CheckpointConfig, Config, ConfigError
from lmjax.errors import FaultError

log = logging.getLogger("lmjax")

CHECKPOINTS = "checkpoints"
UNREADABLE = "unreadable"  # CHECKPOINTS/UNREADABLE/: steps set aside (no step number: orbax skips it)
ITEMS = ("params", "train", "data", "meta")
# Model fields that change only how the forward pass is computed; every other model field
# changes the parameters or what they mean, and a resume refuses it.
COMPUTE_ONLY_MODEL_FIELDS = ("dtype", "remat", "attention", "matmul", "scan_layers",
                             "max_seq_len", "init_std", "logits_chunk")
TOKENIZER_FIELDS = ("data.tokenizer_vocab_size",)


class ResumeError(ConfigError):
    """A checkpoint cannot be resumed as asked; the message says what to do instead."""


class StructureMismatch(ResumeError):
    """The saved state's leaves differ from those this config builds (not a damaged file)."""


class TornCheckpoint(Exception):
    """Evidence that a checkpoint's own files are damaged."""


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def absolute(path: str) -> str:
    """orbax wants absolute paths: a local path is made absolute, a URL (gs://...) is kept."""
    return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(absolute(workdir), CHECKPOINTS)


# ---------------------------------------------------------------- metadata and config checks


def config_fingerprint(config: Config) -> str:
    return hashlib.sha256(config_lib.to_json(config).encode()).hexdigest()[:16]


def make_metadata(config: Config, tokenizer_fingerprint: str | None, mesh) -> dict:
    """What a checkpoint records about the run that wrote it (JSON-able)."""
    from lmjax import __version__, model
    return {"lmjax_version": __version__, "config_fingerprint": config_fingerprint(config),
            "config": config_lib.to_dict(config), "tokenizer_fingerprint": tokenizer_fingerprint,
            "mesh_shape": {k: int(v) for k, v in mesh.shape.items()},
            "process_count": jax.process_count(), "device_count": jax.device_count(),
            "param_layout_version": model.PARAM_LAYOUT_VERSION}


def refused_fields(changes: dict[str, tuple]) -> list[str]:
    """The changed fields (from `config.diff`) a resume must refuse: parameter shapes or
    meaning, and the tokenizer."""
    return sorted(k for k in changes
                  if (k.startswith("model.") and k[len("model."):] not in COMPUTE_ONLY_MODEL_FIELDS)
                  or k in TOKENIZER_FIELDS)


def check_resumable(meta: dict, config: Config, where: str) -> dict[str, tuple]:
    """Raises ResumeError when `config` cannot continue the run that wrote `meta`; returns the
    allowed changes `{field: (checkpoint value, new value)}`.

    `data.tokenizer` (a path) is not compared: the tokenizer fingerprint is, once loaded.
    """
    from lmjax import model
    layout = meta.get("param_layout_version")
    if layout != model.PARAM_LAYOUT_VERSION:
        raise ResumeError(f"{where} has parameter layout version {layout}, this lmjax expects "
                          f"{model.PARAM_LAYOUT_VERSION}: convert it with the lmjax version "
                          f"{meta.get('lmjax_version')} that wrote it, or start a new workdir.")
    saved = config_lib.from_dict(meta["config"])
    changes = {k: v for k, v in config_lib.diff(saved, config).items() if k != "data.tokenizer"}
    refused = refused_fields(changes)
    if refused:
        lines = "\n  ".join(f"{k}: checkpoint {changes[k][0]!r}, now {changes[k][1]!r}"
                            for k in refused)
        raise ResumeError(f"cannot resume {where}: these fields change the model or tokenizer:\n  "
                          f"{lines}\nFix: resume with the checkpoint's values (--set FIELD=VALUE), "
                          "start a new workdir, or load only the params with --init-from.")
    return changes


def check_tokenizer(meta: dict, fingerprint: str | None, where: str) -> None:
    saved = meta.get("tokenizer_fingerprint")
    if saved != fingerprint:
        raise ResumeError(f"cannot resume {where}: it was trained with tokenizer {saved}, this run "
                          f"loads tokenizer {fingerprint}. Fix: set data.tokenizer to the "
                          "checkpoint's tokenizer (the workdir's tokenizer.model) or start a new "
                          "workdir.")


# ---------------------------------------------------------------- finiteness


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _split(state) -> dict[str, Any]:
    return {"params": state.params,
            "train": {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}}


# ---------------------------------------------------------------- damage, faults, layouts

# tensorstore statuses and messages that mean a checkpoint's files are bad: an array file that
# is missing or shorter than its index says, an undecodable manifest or chunk.
_DAMAGE_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "Data corruption", "Error decoding")
# Storage errors that say nothing about the files (the service, the network or the mount
# failed): retried with backoff, then reported; the checkpoint stays where it is.
_TRANSIENT_MARKERS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED")
_TRANSIENT_ERRNOS = (errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNABORTED, errno.EBUSY, errno.ESTALE)
RETRY_DELAYS_S = (1.0, 4.0, 16.0)


def classify(e: BaseException) -> str:
    """'oom', 'transient', 'damage' or 'other' (a configuration mismatch or a bug)."""
    text = str(e)
    if isinstance(e, MemoryError) or ("RESOURCE_EXHAUSTED" in text and "memory" in text.lower()):
        return "oom"
    if isinstance(e, TornCheckpoint):
        return "damage"
    if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
        return "transient"
    if any(m in text for m in _TRANSIENT_MARKERS):
        return "transient"
    if isinstance(e, (FileNotFoundError, json.JSONDecodeError)):
        return "damage"
    if any(m in text for m in _DAMAGE_MARKERS):
        return "damage"
    return "other"


def retrying(what: str, fn: Callable[[], Any]) -> Any:
    """fn(), retried after RETRY_DELAYS_S while it fails with a transient storage error; the
    last error is raised as FaultError."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified; anything else is re-raised
            if classify(e) != "transient":
                raise
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            if delay is None:
                raise FaultError(f"{what}: storage kept failing after {len(RETRY_DELAYS_S)} "
                                 f"retries ({first}). No checkpoint was moved or deleted: rerun "
                                 "the same command once the storage is reachable.") from e
            log.warning("%s: transient storage error (%s); retrying in %g s", what, first, delay)
            time.sleep(delay)


def damage_evidence(step_dir: str) -> str | None:
    """What is missing or unparsable in a committed step directory (None: looks whole).
    Array files are checked by reading them (`classify` of the restore's error)."""
    from etils import epath
    root = epath.Path(step_dir)
    missing = [i for i in ITEMS if not (root / i).is_dir()]
    if missing:
        return f"items {missing} are missing"
    for item, name in (("params", "_METADATA"), ("train", "_METADATA"), ("data", "metadata"),
                       ("meta", "metadata")):
        path = root / item / name
        if not path.exists():
            return f"{item}/{name} is missing"
        try:
            json.loads(path.read_text())
        except ValueError:
            return f"{item}/{name} is not valid JSON"
    return None


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


def _positions(tree) -> list[str]:
    """Each leaf's full key path, positions included."""
    def part(k):
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    return ["/".join(map(part, p)) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _signature(tree) -> list[tuple]:
    return [(_leaf_names(p), tuple(x.shape), np.dtype(x.dtype).name)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


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
        raise StructureMismatch(f"the saved {item} state has {len(have)} arrays, this config "
                                f"builds {len(want)} (only saved: {only_saved or 'none'}; only "
                                f"new: {only_new or 'none'})")
    return jax.tree.unflatten(jax.tree.structure(saved), jax.tree.leaves(target))


# ---------------------------------------------------------------- the manager


class Checkpointer:
    """Async saves and restores of the train state in `directory` (an orbax CheckpointManager).

    Keeps the newest `cfg.keep` checkpoints plus every step divisible by `cfg.keep_every`.
    `save` returns once the device arrays are copied to host; the files are written in the
    background and a save is logged as committed only when orbax has committed it.
    """

    def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig(), *,
                 read_only: bool = False, resumed_at: int | None = None):
        """resumed_at: the step the run restored (0 for a fresh start); step directories newer
        than it are set aside before the first save (see `_clear_newer`)."""
        ocp = _ocp()
        from orbax.checkpoint import checkpoint_managers as policies
        self.directory = directory
        self.cfg = cfg
        keep = [policies.LatestN(cfg.keep)]
        if cfg.keep_every:
            keep.append(policies.EveryNSteps(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save, read_only=read_only,
            create=not read_only, save_interval_steps=0 if read_only else 1,
            preservation_policy=policies.AnyPreservationPolicy(keep))
        self._manager = ocp.CheckpointManager(directory, options=options)
        self._uncommitted: int | None = None
        self._failed = False
        self._resumed_at = resumed_at

    def steps(self) -> list[int]:
        """Committed steps, oldest first (not yet checked for readability)."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, *, data_state: dict, meta: dict,
             step_finite: jax.Array | bool = True, allow_nonfinite_step: bool = False) -> float:
        """Starts saving `state` as `step`; returns the seconds training was blocked.

        Checks first, synchronously, that the step's loss and gradients (`step_finite`, the
        train step's metrics["finite"]) and every array of the state are finite, and raises
        FloatingPointError instead of saving otherwise. `allow_nonfinite_step`: the step was
        skipped (checkpoint.on_nonfinite=skip kept the old params), so only the state counts.
        """
        # Waiting for the step in flight is not save overhead: start the clock after it.
        step_finite = bool(jax.block_until_ready(step_finite))
        start = time.perf_counter()
        if not (allow_nonfinite_step or step_finite):
            raise FloatingPointError(f"non-finite loss or gradient at step {step}: not saving "
                                     "it; the newest checkpoint is still "
                                     f"{self.latest_step()}.")
        if not bool(_all_finite(state)):
            raise FloatingPointError(f"the train state after step {step} holds non-finite "
                                     "values: not saving it; the newest checkpoint is still "
                                     f"{self.latest_step()}.")
        self._clear_newer()
        if step in self._manager.all_steps():
            return 0.0
        ocp = _ocp()
        items = _split(state)
        self._note_committed(wait=True)
        self._uncommitted = step
        try:
            self._manager.save(step, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(items["params"]),
                train=ocp.args.StandardSave(items["train"]),
                data=ocp.args.JsonSave({**data_state, "step": int(step)}),
                meta=ocp.args.JsonSave({**meta, "step": int(step), "saved_at": time.time()})))
        except Exception as e:  # noqa: BLE001 - any failed write stops the run cleanly
            raise self._save_failed(step, e) from e
        blocked = time.perf_counter() - start
        log.info("checkpoint %d: saving (training blocked %.3f s)", step, blocked)
        self._note_committed(wait=not self.cfg.async_save)
        return blocked

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _clear_newer(self) -> None:
        """Sets aside every step directory newer than the step the run resumed from, once.

        The resume tried those steps first and found them torn (or checkpoint.allow_fresh
        started over them): left in place they would take their step's slot, so that save
        would be skipped, and count among the `keep` newest.
        """
        if self._resumed_at is None:
            return
        newer = [p for p, step in _step_dirs(self.directory) if step > self._resumed_at]
        self._resumed_at = None
        for path in newer:
            _set_aside(path, "an unfinished save" if "." in path.name else
                       "unreadable when the run resumed, or checkpoint.allow_fresh")
        if newer:
            _barrier("lmjax_cleared_newer")
            self._manager.reload()

    def _note_committed(self, wait: bool) -> None:
        """Logs the pending save as committed once it is; a failed write raises FaultError."""
        if self._uncommitted is None:
            return
        try:
            if wait:
                self._manager.wait_until_finished()
            elif self._manager.is_saving_in_progress():
                return
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001 - any failed write stops the run cleanly
            raise self._save_failed(self._uncommitted, e) from e
        log.info("checkpoint %d: committed to %s", self._uncommitted, self.directory)
        self._uncommitted = None

    def _save_failed(self, step: int, error: BaseException) -> FaultError:
        """The error that stops a run whose save of `step` failed (a full disk, a lost bucket):
        training on could lose more work than it gains, and the previous checkpoint is intact
        because orbax commits a save only once it is whole."""
        self._uncommitted, self._failed = None, True
        self._manager.reload()
        text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        log.error("CHECKPOINT %d FAILED: %s", step, text)
        return FaultError(f"checkpoint {step} could not be written ({text}): training stopped. "
                          f"The newest committed checkpoint, {self._manager.latest_step()}, is "
                          "untouched: free space (or fix the storage) and rerun the same command "
                          "to resume from it.")

    def poll(self) -> None:
        """Logs a background save that has committed since the last call; never blocks."""
        self._note_committed(wait=False)

    def wait(self) -> None:
        """Blocks until every pending save is committed."""
        self._note_committed(wait=True)
        if not self._failed:
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            if not self._failed:
                self.wait()
        finally:
            self._manager.close()

    def read_json(self, step: int, item: str) -> dict:
        ocp = _ocp()
        return self._manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.JsonRestore()}))[item]

    def saved_tree(self, step: int, item: str):
        """The structure of a saved array item, leaves being orbax ArrayMetadata."""
        from etils import epath
        handler = _ocp().StandardCheckpointHandler()
        return handler.metadata(epath.Path(self.directory) / str(step) / item).tree

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """(state, data position) of `step`, laid out like `abstract_state` (a TrainState of
        ShapeDtypeStructs with the current mesh's shardings).

        The saved structure may differ from the target's by stateless wrappers only
        (`in_saved_layout`); any other difference raises StructureMismatch before reading.
        """
        ocp = _ocp()
        target = _split(abstract_state)
        saved = {k: self.saved_tree(step, k) for k in ("params", "train")}
        layout = {k: in_saved_layout(saved[k], target[k], k) for k in saved}
        if _positions(saved["train"]) != _positions(target["train"]):
            log.warning("checkpoint %d: the optimizer state's layout changed (a stateless "
                        "wrapper such as clipping was added or removed); restoring its saved "
                        "moments and counts into the new layout", step)
        out = self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(layout["params"]),
            train=ocp.args.StandardRestore(layout["train"]),
            data=ocp.args.JsonRestore()))
        out = {**out, **{k: jax.tree.unflatten(jax.tree.structure(target[k]),
                                               jax.tree.leaves(out[k])) for k in layout}}
        train = out["train"]
        state = abstract_state.replace(params=out["params"], step=train["step"],
                                       opt_state=train["opt_state"], rng=train["rng"])
        return state, out["data"]

    def restore_params(self, step: int, abstract_params) -> Any:
        ocp = _ocp()
        return self._manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]


def abstract_state(init_fn: Callable, shardings) -> Any:
    """The state `init_fn` would create, as ShapeDtypeStructs carrying `shardings`."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        jax.eval_shape(init_fn), shardings)


# ---------------------------------------------------------------- resuming


@dataclasses.dataclass
class Candidate:
    directory: str
    step: int
    meta: dict
    changes: dict = dataclasses.field(default_factory=dict)  # allowed config changes

    @property
    def where(self) -> str:
        return f"{self.directory} step {self.step}"


# How a restore attempt ended, worst last: all processes act on the worst outcome of any.
OUTCOMES = ("ok", "torn", "refused", "failed")


@dataclasses.dataclass
class ResumePlan:
    """Where a run's state comes from: checkpoints to try newest first, or params to load, or
    nothing (a fresh start). Built by `plan_resume` before any expensive work.

    Resume never moves or deletes anything: an unreadable step is skipped (and set aside by
    the first save, `Checkpointer._clear_newer`); any other failure stops the run.
    """

    candidates: list[Candidate]
    init_from: str | None = None
    unreadable: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)
    allow_fresh: bool = False

    def check_tokenizer(self, fingerprint: str | None) -> None:
        for c in self.candidates:
            check_tokenizer(c.meta, fingerprint, c.where)
        if self.init_from and not self.candidates:
            check_init_tokenizer(self.init_from, fingerprint)

    def load(self, init_fn: Callable, shardings, workdir: str, model_cfg) -> tuple[Any, dict | None, str]:
        """(state, saved data position or None, description): the newest checkpoint that
        restores, else `init_from` params on a fresh optimizer, else a fresh init.

        Only damage (`classify`) makes a step unreadable and the previous one tried. A state
        structure this config cannot take, out-of-memory and storage faults (after retries)
        stop the run. If checkpoints exist but none is readable the run stops too, unless
        checkpoint.allow_fresh.
        """
        target = abstract_state(init_fn, shardings)
        for c in self.candidates:
            restored = self._restore(c, target)
            if restored is not None:
                log.info("resumed from %s", c.where)
                return (*restored, c.where)
        if self.unreadable and not self.allow_fresh:
            listing = "; ".join(f"step {s}: {e.splitlines()[0][:200]}" for _, s, e in self.unreadable)
            raise ResumeError(f"checkpoints exist but none could be read ({listing}). Nothing was "
                              "moved or deleted. Fix: restore them, point --restore-from at a "
                              "readable checkpoint, or start over with --set "
                              "checkpoint.allow_fresh=true (the first save then moves them to "
                              f"{os.path.join(checkpoint_dir(workdir), UNREADABLE)}/).")
        if self.unreadable:
            log.warning("checkpoint.allow_fresh: starting from scratch although steps %s exist "
                        "(unreadable)", [s for _, s, _ in self.unreadable])
        state = init_fn()
        if self.init_from is None:
            return state, None, "fresh init"
        return self._with_init_params(state, target, model_cfg)

    def _restore(self, c: Candidate, target) -> tuple[Any, dict] | None:
        """(state, data position), or None when `c` is torn on some process."""
        result, error, outcome = None, None, "ok"
        try:
            evidence = damage_evidence(os.path.join(c.directory, str(c.step)))
            if evidence:
                raise TornCheckpoint(evidence)
            with _ReadOnly(c.directory) as ckpt:
                result = retrying(f"restoring {c.where}", lambda: ckpt.restore(c.step, target))
        except StructureMismatch as e:
            outcome, error = "refused", e
        except Exception as e:  # noqa: BLE001 - classified below; not damage means stop
            outcome, error = ("torn" if classify(e) == "damage" else "failed"), e
        outcome = _worst(outcome)
        if outcome == "ok":
            return result
        if outcome == "torn":
            text = f"{type(error).__name__}: {error}" if error else "torn on another process"
            log.error("checkpoint %s is unreadable (%s); trying the previous one", c.where,
                      text.splitlines()[0][:300])
            self.unreadable.append((c.directory, c.step, text))
            return None
        raise _stop_error(c, error)

    def _with_init_params(self, state, target, model_cfg) -> tuple[Any, None, str]:
        from lmjax.convert import hf
        saved_cfg, params = hf.load_params_dir(self.init_from)
        changes = {k: v for k, v in _model_diff(saved_cfg, model_cfg).items()
                   if k[len("model."):] not in COMPUTE_ONLY_MODEL_FIELDS}
        if changes:
            lines = "\n  ".join(f"{k}: params {a!r}, config {b!r}" for k, (a, b) in changes.items())
            raise ResumeError(f"--init-from {self.init_from} does not fit this model:\n  {lines}\n"
                              "Fix: set those model fields to the params' values.")
        params = jax.tree.map(lambda x, t: jax.make_array_from_callback(
            t.shape, t.sharding, lambda idx: np.asarray(x, t.dtype)[idx]), params, target.params)
        log.info("initialized params from %s", self.init_from)
        return state.replace(params=params), None, f"params from {self.init_from}"


def _stop_error(c: Candidate, error: BaseException | None) -> Exception:
    """The error that stops a resume which failed for a reason other than damage."""
    untouched = "No checkpoint was moved or deleted."
    if error is None:
        return FaultError(f"another process could not restore {c.where} (see its log). "
                          f"{untouched}")
    if isinstance(error, StructureMismatch):
        fields = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(c.changes.items())
                           if k.startswith("optim.")) or "no optim field (another lmjax version?)"
        return ResumeError(f"cannot resume {c.where}: {error}. Changed since it was saved: "
                           f"{fields}. Fix: resume with the checkpoint's values (--set "
                           "FIELD=VALUE), or start a new workdir from its params (lmjax "
                           f"checkpoint export, then --init-from). {untouched}")
    if classify(error) == "oom":
        return ResumeError(f"out of memory restoring {c.where} on this mesh "
                           f"({str(error).splitlines()[0][:200]}). {untouched} Fix: more "
                           "devices or processes, or shard the state wider (mesh.fsdp).")
    if isinstance(error, (ConfigError, FaultError)):
        return error
    return FaultError(f"restoring {c.where} failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:300] if str(error) else ''}. {untouched} "
                      "Rerun with -v for the traceback.")


def _model_diff(a, b) -> dict[str, tuple]:
    return config_lib.diff(Config(model=a), Config(model=b))


def _worst(outcome: str) -> str:
    """The worst of every process's `outcome` (OUTCOMES order)."""
    if jax.process_count() == 1:
        return outcome
    from jax.experimental import multihost_utils
    codes = multihost_utils.process_allgather(np.array(OUTCOMES.index(outcome), np.int32))
    return OUTCOMES[int(np.max(codes))]


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _step_dirs(directory: str) -> list[tuple[Any, int]]:
    """(path, step) of every step directory, committed or not (`STEP`, `STEP.orbax-...-tmp-N`)."""
    from etils import epath
    root = epath.Path(directory)
    if not root.exists():
        return []
    out = []
    for p in root.iterdir():
        head = p.name.split(".")[0]
        if head.isdigit() and p.is_dir():
            out.append((p, int(head)))
    return sorted(out, key=lambda x: x[1])


def _set_aside(path, reason: str) -> None:
    """Moves a step directory to CHECKPOINTS/UNREADABLE/ (process 0), logging where and why.
    Inside the checkpoints directory, because a rename cannot leave its filesystem (it may be
    a mount of its own)."""
    if jax.process_index() == 0:
        dst = path.parent / UNREADABLE / f"{path.name}-{int(time.time())}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        path.rename(dst)
        log.warning("moved checkpoint directory %s to %s (%s)", path, dst, reason)


class _ReadOnly:
    def __init__(self, directory: str):
        self.ckpt = Checkpointer(directory, read_only=True)

    def __enter__(self) -> Checkpointer:
        return self.ckpt

    def __exit__(self, *exc) -> None:
        self.ckpt._manager.close()


def _read_candidates(directory: str, steps: list[int], config: Config,
                     unreadable: list) -> list[Candidate]:
    """Newest first, those whose metadata reads; refuses (raises) on a changed model."""
    out = []
    with _ReadOnly(directory) as ckpt:
        for step in sorted(steps, reverse=True):
            try:
                meta = retrying(f"reading {directory} step {step}",
                                lambda step=step: ckpt.read_json(step, "meta"))
            except FaultError:
                raise
            except Exception as e:  # noqa: BLE001 - unreadable metadata is damage
                log.error("checkpoint %s step %d: metadata unreadable (%s)", directory, step,
                          str(e).splitlines()[0][:300])
                unreadable.append((directory, step, f"metadata: {e}"))
                continue
            changes = check_resumable(meta, config, f"{directory} step {step}")
            if not out:
                for k, (a, b) in sorted(changes.items()):
                    log.warning("resuming with a changed config: %s: %r -> %r", k, a, b)
            out.append(Candidate(directory, step, meta, changes))
    return out


def _steps_in(directory: str) -> list[int]:
    from etils import epath
    if not epath.Path(directory).exists():
        return []
    with _ReadOnly(directory) as ckpt:
        return ckpt.steps()


def plan_resume(workdir: str, config: Config, *, restore_from: str | None = None,
                init_from: str | None = None) -> ResumePlan:
    """Decides where the state comes from; reads only metadata.

    - the workdir has checkpoints: resume from the newest readable one (the flags are then
      ignored, so the same command line resumes a preempted run), unless `restore_from` is a
      step number or a step of this workdir;
    - `restore_from`: a step number, a checkpoints directory (its newest step) or one step
      directory `.../checkpoints/STEP`;
    - `init_from`: a params-only directory (`lmjax checkpoint export`, `lmjax convert from-hf`);
    - otherwise a fresh start.
    Raises ResumeError on a refused config change or when checkpoints exist but none is readable.
    """
    if restore_from and init_from:
        raise ResumeError("--restore-from and --init-from exclude each other: the first "
                          "continues a run (state, optimizer, data position), the second only "
                          "loads parameters.")
    own = checkpoint_dir(workdir)
    own_steps = _steps_in(own)
    directory, steps = own, own_steps
    if restore_from is not None and restore_from.strip().isdigit():
        step = int(restore_from)
        if step not in own_steps:
            raise ResumeError(f"--restore-from {step}: {own} has no committed step {step} "
                              f"(it has {own_steps or 'none'}).")
        steps = [step]
    elif restore_from is not None and not own_steps:
        directory, steps = _parse_checkpoint_path(restore_from)
    elif restore_from is not None:
        log.warning("%s already has checkpoints %s: resuming from them, not from --restore-from "
                    "%s", own, own_steps, restore_from)
    if steps and init_from:
        log.warning("ignoring --init-from %s: resuming from the checkpoints in %s", init_from,
                    directory)
        init_from = None
    later = [s for s in own_steps if steps and directory == own and s > max(steps)]
    if later:
        raise ResumeError(f"--restore-from step {max(steps)}: {own} also has later steps {later}, "
                          "which new saves would collide with. Fix: move them away, or restore "
                          "into a new workdir with --restore-from "
                          f"{os.path.join(own, str(max(steps)))}.")
    uncommitted = [p.name for p, _ in _step_dirs(own) if p.name.isdigit()]
    if not steps and uncommitted and not config.checkpoint.allow_fresh:
        raise ResumeError(f"{own} has step directories {uncommitted} but none is committed "
                          "(torn saves). Nothing was moved or deleted. Fix: restore them, or "
                          "start over with --set checkpoint.allow_fresh=true.")
    plan = ResumePlan([], init_from, allow_fresh=config.checkpoint.allow_fresh)
    plan.candidates = _read_candidates(directory, steps, config, plan.unreadable) if steps else []
    if steps and not plan.candidates and not plan.allow_fresh:
        raise ResumeError(f"checkpoints {steps} exist in {directory} but none has readable "
                          "metadata. Nothing was moved or deleted. Fix: restore them, or start "
                          "over with --set checkpoint.allow_fresh=true.")
    return plan


def _parse_checkpoint_path(path: str) -> tuple[str, list[int]]:
    """(checkpoints directory, steps to try) for a `--restore-from` path."""
    from etils import epath
    p = epath.Path(absolute(path))
    if (p / "meta").exists() and p.name.isdigit():
        return str(p.parent), [int(p.name)]
    for root in (p, p / CHECKPOINTS):
        steps = _steps_in(str(root)) if root.exists() else []
        if steps:
            return str(root), steps
    raise ResumeError(f"--restore-from {path}: no committed checkpoint there. Give a workdir, "
                      "its checkpoints/ directory, one checkpoints/STEP directory, or a step "
                      "number of this workdir.")


# ---------------------------------------------------------------- params for eval, export


def _params_target(model_cfg) -> Any:
    from lmjax import model
    device = jax.local_devices()[0]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
        model.param_shapes(model_cfg))


def load_params(workdir: str, step: int | None = None) -> tuple[Config, Any, str]:
    """(Config, params on one local device, tokenizer path) of a checkpoint: `step`, or the
    newest readable one (damaged steps are logged and skipped). The tokenizer path is the
    workdir's tokenizer.model when it exists (the run trained it), else data.tokenizer."""
    _, meta, params = _load_params(workdir, step)
    config = config_lib.from_dict(meta["config"])
    local = os.path.join(workdir, "tokenizer.model")
    tokenizer_path = local if os.path.exists(local) else config.data.tokenizer
    return config, params, tokenizer_path


def _load_params(workdir: str, step: int | None) -> tuple[int, dict, Any]:
    """(step, metadata, params) of `step` or of the newest readable step."""
    directory = checkpoint_dir(workdir)
    steps = _steps_in(directory)
    if not steps:
        raise ResumeError(f"{workdir} has no committed checkpoints in {directory}.")
    if step is not None and step not in steps:
        raise ResumeError(f"{directory} has no step {step}; it has {steps}.")
    tried = []
    with _ReadOnly(directory) as ckpt:
        for s in [step] if step is not None else sorted(steps, reverse=True):
            try:
                return (s, *_read_params(ckpt, s))
            except (ConfigError, FaultError):
                raise
            except Exception as e:  # noqa: BLE001 - damage: the previous step is tried
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
    model_cfg = config_lib.from_dict(meta["config"]).model
    return meta, retrying(where, lambda: ckpt.restore_params(step, _params_target(model_cfg)))


# Beside an exported params directory: the fingerprint of the tokenizer the params were trained
# with, so `--init-from` can refuse another tokenizer.
TOKENIZER_RECORD = "lmjax_tokenizer.json"


def export_params(workdir: str, step: int | None, out: str) -> str:
    """Writes `out/params` + `out/model_config.json` (what `--init-from`, eval, generation and
    HF export read) and `out/TOKENIZER_RECORD` from a checkpoint of `workdir`; returns a
    one-line summary."""
    from etils import epath
    from lmjax.convert import hf
    step, meta, params = _load_params(workdir, step)
    hf.save_params_dir(config_lib.from_dict(meta["config"]).model, params, out)
    (epath.Path(absolute(out)) / TOKENIZER_RECORD).write_text(json.dumps(
        {"tokenizer_fingerprint": meta.get("tokenizer_fingerprint"), "workdir": workdir,
         "step": step}))
    return f"wrote params of {workdir} step {step} to {out}"


def check_init_tokenizer(init_from: str, fingerprint: str | None) -> None:
    """Refuses `--init-from` params trained with another tokenizer than `fingerprint`; params
    without a record (an HF import) are only warned about."""
    from etils import epath
    record = epath.Path(absolute(init_from)) / TOKENIZER_RECORD
    if not record.exists():
        log.warning("--init-from %s records no tokenizer (an HF import?): make sure "
                    "data.tokenizer is the one its params were trained with", init_from)
        return
    saved = json.loads(record.read_text()).get("tokenizer_fingerprint")
    if saved != fingerprint:
        raise ResumeError(f"--init-from {init_from}: its params were trained with tokenizer "
                          f"{saved}, this run loads tokenizer {fingerprint}. Fix: set "
                          "data.tokenizer to the tokenizer of the run it was exported from.")


def _dir_size(path) -> int:
    """Bytes under `path` (an epath; recursion by listing, which also works on GCS)."""
    return sum(_dir_size(p) if p.is_dir() else p.stat().length for p in path.iterdir())


def list_checkpoints(workdir: str) -> list[dict]:
    """One row per step directory (committed or not): step, bytes, complete, metadata."""
    from etils import epath
    root = epath.Path(checkpoint_dir(workdir))
    if not root.exists():
        return []
    committed = set(_steps_in(str(root)))
    rows = []
    with _ReadOnly(str(root)) as ckpt:
        for p in sorted(root.iterdir(), key=lambda q: q.name):
            if not p.is_dir():
                continue
            step_text = p.name.split(".")[0]
            if not step_text.isdigit():
                continue
            step = int(step_text)
            row = {"step": step, "path": str(p), "bytes": _dir_size(p),
                   "complete": False, "problem": "not committed (a save in progress or torn)"}
            if step in committed and p.name == str(step):
                missing = [i for i in ITEMS if not (p / i).exists()]
                try:
                    meta = ckpt.read_json(step, "meta") if not missing else None
                    row.update(complete=not missing, problem=f"missing {missing}" if missing else "")
                    if meta:
                        row.update({k: meta.get(k) for k in (
                            "lmjax_version", "config_fingerprint", "tokenizer_fingerprint",
                            "mesh_shape", "process_count", "device_count", "saved_at")})
                except Exception as e:  # noqa: BLE001 - reported in the table
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
            detail = (f"saved {saved} config {r['config_fingerprint']} tokenizer "
                      f"{r['tokenizer_fingerprint']} mesh {r['mesh_shape']} processes "
                      f"{r['process_count']} devices {r['device_count']} lmjax "
                      f"{r['lmjax_version']}")
        else:
            detail = r["problem"]
        lines.append(f"{r['step']:>8} {size:>10} {str(r['complete']).lower():>8}  {detail}")
    return "\n".join(lines)


# ---------------------------------------------------------------- when to save and stop


class StopSignals:
    """While active, SIGTERM and SIGINT ask the run to save and stop at the next step
    boundary; a second signal exits at once (the default action of that signal)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning("received %s: saving at the next step boundary, then exiting (send it "
                    "again to exit at once)", signal.Signals(signum).name)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            # None: a handler installed outside Python (jax's preemption notifier), which
            # cannot be reinstalled from here; the default action is the safe fallback.
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


class SaveSchedule:
    """Decides at each step boundary whether to save and whether to stop; all processes reach
    the same decision at the same step.

    Saves at multiples of every_steps and keep_every, after every_minutes since the last save
    (process 0's clock), at the last step, and when stopping on a signal or a JAX preemption
    notice. With several processes, local requests are combined by a tiny all-reduce that is
    read one step later (like the metrics), so the host never waits on the device for it.
    """

    def __init__(self, cfg: CheckpointConfig, total_steps: int, signals: StopSignals):
        self.cfg = cfg
        self.total = total_steps
        self.signals = signals
        self.last_save = time.monotonic()
        self._reduce = _make_flag_reduce() if jax.process_count() > 1 else None
        self._pending = None  # the all-reduced [stop, time_due] of the previous boundary

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def _local_flags(self) -> np.ndarray:
        time_due = (self.cfg.every_minutes > 0 and jax.process_index() == 0
                    and time.monotonic() - self.last_save >= 60 * self.cfg.every_minutes)
        return np.array([self.signals.received is not None, time_due], np.int32)

    def __call__(self, step: int) -> tuple[bool, bool]:
        """(save, stop) after `step` updates."""
        from jax.experimental import multihost_utils
        try:
            preempted = multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # the preemption service is off
            preempted = False
        if self._reduce is None:
            stop, time_due = (bool(x) for x in self._local_flags())
        else:
            agreed, self._pending = self._pending, self._reduce(self._local_flags())
            flags = np.zeros(2, np.int32) if agreed is None else np.asarray(agreed)
            stop, time_due = bool(flags[0]), bool(flags[1])
        stop = stop or preempted
        save = (stop or time_due or step == self.total
                or step % self.cfg.every_steps == 0
                or (self.cfg.keep_every > 0 and step % self.cfg.keep_every == 0))
        return save, stop


def _make_flag_reduce() -> Callable[[np.ndarray], jax.Array]:
    """flags: int32 [k] per process -> a (not yet fetched) global element-wise max [k]."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(jax.devices()), ("all",))
    rows = NamedSharding(mesh, P("all"))
    reduce = jax.jit(lambda x: jnp.max(x, axis=0), out_shardings=NamedSharding(mesh, P()))

    def dispatch(flags: np.ndarray) -> jax.Array:
        local = np.tile(flags[None], (jax.local_device_count(), 1))
        return reduce(jax.make_array_from_process_local_data(
            rows, local, (jax.device_count(), flags.shape[0])))

    return dispatch


def describe_resume(step: int, source: str) -> dict:
    """The metrics.jsonl record that marks where a run (re)started."""
    return {"event": "start", "restored_step": step, "restored_from": source}


def json_summary(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, default=str)
