"""orbax I/O: the Checkpointer (async saves, restores, set-aside of newer steps), the
finiteness check before a save, and the storage-fault rules (damage vs. transient, retries)."""

from __future__ import annotations

import errno
import json
import logging
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from lmjax import storage
from lmjax.checkpoint.compat import in_saved_layout, positions
from lmjax.checkpoint.paths import ITEMS
from lmjax.config import CheckpointConfig
from lmjax.errors import FaultError
from lmjax.parallel import distributed
from lmjax.workdir_names import UNREADABLE

log = logging.getLogger("lmjax")


class TornCheckpoint(Exception):
    """Evidence that a checkpoint's own files are damaged."""


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _split(state) -> dict[str, Any]:
    return {
        "params": state.params,
        "train": {"step": state.step, "opt_state": state.opt_state, "rng": state.rng},
    }


# tensorstore statuses and messages that mean a checkpoint's files are bad: an array file that
# is missing or shorter than its index says, an undecodable manifest or chunk.
_DAMAGE_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "Data corruption", "Error decoding")
# Storage errors that say nothing about the files (the service, the network or the mount
# failed): retried with backoff, then reported; the checkpoint stays where it is.
_TRANSIENT_MARKERS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED")
_TRANSIENT_ERRNOS = (
    errno.EIO,
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EBUSY,
    errno.ESTALE,
)
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
        except Exception as e:  # classified; anything else is re-raised
            if classify(e) != "transient":
                raise
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            if delay is None:
                raise FaultError(
                    f"{what}: storage kept failing after {len(RETRY_DELAYS_S)} "
                    f"retries ({first}). No checkpoint was moved or deleted: rerun "
                    "the same command once the storage is reachable."
                ) from e
            log.warning("%s: transient storage error (%s); retrying in %g s", what, first, delay)
            time.sleep(delay)


def damage_evidence(step_dir: str) -> str | None:
    """What is missing or unparsable in a committed step directory (None: looks whole).
    Array files are checked by reading them (`classify` of the restore's error)."""
    root = epath.Path(step_dir)
    missing = [i for i in ITEMS if not (root / i).is_dir()]
    if missing:
        return f"items {missing} are missing"
    for item, name in (
        ("params", "_METADATA"),
        ("train", "_METADATA"),
        ("data", "metadata"),
        ("meta", "metadata"),
    ):
        path = root / item / name
        if not path.exists():
            return f"{item}/{name} is missing"
        try:
            json.loads(path.read_text())
        except ValueError:
            return f"{item}/{name} is not valid JSON"
    return None


class Checkpointer:
    """Async saves and restores of the train state in `directory` (an orbax CheckpointManager).

    Keeps the newest `cfg.keep` checkpoints plus every step divisible by `cfg.keep_every`.
    `save` returns once the device arrays are copied to host; the files are written in the
    background and a save is logged as committed only when orbax has committed it.
    """

    def __init__(
        self,
        directory: str,
        cfg: CheckpointConfig = CheckpointConfig(),
        *,
        read_only: bool = False,
        resumed_at: int | None = None,
        guard: Callable[[], None] = lambda: None,
        lease_lost: Callable[[], str | None] = lambda: None,
        before_commit: Callable[[], None] = lambda: None,
    ):
        """resumed_at: the step the run restored (0 for a fresh start); step directories newer
        than it are set aside before the first save (see `_clear_newer`). guard: called by
        every process before each save; raises to stop the run instead (the workdir's lease,
        `lease.held`). lease_lost: why this process knows the lease to be lost (None: it does
        not), named when a save fails: a run that took the workdir over sets aside the
        unfinished save of the run it took it from. before_commit: called on process 0 after
        an async save's files are written and before orbax commits them (the rename of the
        temporary directory, or the commit marker on gs://), in orbax's background thread;
        raising there leaves the save uncommitted and failed, and deletes no older step
        (`lease.Guard.confirm_commit`). Sync saves have no such hook (the guard runs just
        before them)."""

        self.directory = directory
        self.cfg = cfg
        keep = [ocp.checkpoint_managers.LatestN(cfg.keep)]
        if cfg.keep_every:
            keep.append(ocp.checkpoint_managers.EveryNSteps(cfg.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=cfg.async_save,
            read_only=read_only,
            create=not read_only,
            save_interval_steps=0 if read_only else 1,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            # orbax runs it after the handlers' finalize, right before the commit
            async_options=(
                ocp.AsyncOptions(post_finalization_callback=before_commit)
                if cfg.async_save
                else None
            ),
        )
        self._manager = ocp.CheckpointManager(directory, options=options)
        self._uncommitted: int | None = None
        self._last_saved: int | None = None
        self._failed = False
        self._resumed_at = resumed_at
        self._guard, self._lease_lost = guard, lease_lost

    def steps(self) -> list[int]:
        """Committed steps, oldest first (not yet checked for readability)."""
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state,
        *,
        data_state: dict,
        meta: dict,
        step_finite: jax.Array | bool = True,
        allow_nonfinite_step: bool = False,
    ) -> float:
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
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step}: not saving "
                "it; the newest checkpoint is still "
                f"{self.latest_step()}."
            )
        if not bool(_all_finite(state)):
            raise FloatingPointError(
                f"the train state after step {step} holds non-finite "
                "values: not saving it; the newest checkpoint is still "
                f"{self.latest_step()}."
            )
        self._guard()
        self._clear_newer()
        if step in self._manager.all_steps():
            return 0.0
        items = _split(state)
        self._note_committed(wait=True)
        self._uncommitted = self._last_saved = step
        try:
            self._manager.save(
                step,
                force=True,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(items["params"]),
                    train=ocp.args.StandardSave(items["train"]),
                    data=ocp.args.JsonSave({**data_state, "step": int(step)}),
                    meta=ocp.args.JsonSave({**meta, "step": int(step), "saved_at": time.time()}),
                ),
            )
        except Exception as e:  # any failed write stops the run cleanly
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
        would be skipped, and count among the `keep` newest. Process 0 alone lists and moves
        them; then every process passes the same barrier and re-reads the steps, whatever it
        would have listed itself (process 0's renames may land before another process lists).
        """
        if self._resumed_at is None:
            return
        if jax.process_index() == 0:
            for path, step in step_dirs(self.directory):
                if step > self._resumed_at:
                    set_aside(
                        path,
                        "an unfinished save"
                        if "." in path.name
                        else "unreadable when the run resumed, or checkpoint.allow_fresh",
                    )
        self._resumed_at = None
        distributed.barrier("lmjax_cleared_newer")
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
        except Exception as e:  # any failed write stops the run cleanly
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
        lost = self._lease_lost()
        if lost:
            return FaultError(
                f"checkpoint {step} could not be written ({text}) after the workdir's lease "
                f"was lost ({lost}): another run may own the workdir now, so this one stops "
                "and moves nothing. Rerun the same command to resume once that run has ended."
            )
        return FaultError(
            f"checkpoint {step} could not be written ({text}): training stopped. "
            f"The newest committed checkpoint, {self._manager.latest_step()}, is "
            "untouched: free space (or fix the storage) and rerun the same command "
            "to resume from it."
        )

    def poll(self) -> None:
        """Logs a background save that has committed since the last call; never blocks."""
        self._note_committed(wait=False)

    def wait(self) -> None:
        """Blocks until every pending save is committed. orbax may report an async save as
        finished before its error surfaces, so the final wait turns a late error into the same
        FaultError as an early one."""
        self._note_committed(wait=True)
        if not self._failed:
            try:
                self._manager.wait_until_finished()
            except Exception as e:  # any failed write stops the run cleanly
                raise self._save_failed(self._last_saved or 0, e) from e

    def close(self) -> None:
        try:
            if not self._failed:
                self.wait()
        finally:
            self._manager.close()

    def read_json(self, step: int, item: str) -> dict:
        return self._manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
        )[item]

    def saved_tree(self, step: int, item: str):
        """The structure of a saved array item, leaves being orbax ArrayMetadata."""
        handler = ocp.StandardCheckpointHandler()
        return handler.metadata(epath.Path(self.directory) / str(step) / item).tree

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """(state, data position) of `step`, laid out like `abstract_state` (a TrainState of
        ShapeDtypeStructs with the current mesh's shardings).

        The saved structure may differ from the target's by stateless wrappers only
        (`in_saved_layout`); any other difference raises StructureMismatch before reading.
        """
        target = _split(abstract_state)
        saved = {k: self.saved_tree(step, k) for k in ("params", "train")}
        layout = {k: in_saved_layout(saved[k], target[k], k) for k in saved}
        if positions(saved["train"]) != positions(target["train"]):
            log.warning(
                "checkpoint %d: the optimizer state's layout changed (a stateless "
                "wrapper such as clipping was added or removed); restoring its saved "
                "moments and counts into the new layout",
                step,
            )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(layout["params"]),
                train=ocp.args.StandardRestore(layout["train"]),
                data=ocp.args.JsonRestore(),
            ),
        )
        out = {
            **out,
            **{
                k: jax.tree.unflatten(jax.tree.structure(target[k]), jax.tree.leaves(out[k]))
                for k in layout
            },
        }
        train = out["train"]
        state = abstract_state.replace(
            params=out["params"], step=train["step"], opt_state=train["opt_state"], rng=train["rng"]
        )
        return state, out["data"]

    def restore_params(self, step: int, abstract_params) -> Any:
        return self._manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )["params"]


def abstract_state(init_fn: Callable, shardings) -> Any:
    """The state `init_fn` would create, as ShapeDtypeStructs carrying `shardings`."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init_fn),
        shardings,
    )


def step_dirs(directory: str) -> list[tuple[Any, int]]:
    """(path, step) of every step directory, committed or not (`STEP`, `STEP.orbax-...-tmp-N`)."""
    root = epath.Path(directory)
    if not root.exists():
        return []
    out = []
    for p in root.iterdir():
        head = p.name.split(".")[0]
        if head.isdigit() and p.is_dir():
            out.append((p, int(head)))
    return sorted(out, key=lambda x: x[1])


def set_aside(path, reason: str) -> None:
    """Moves a step directory to CHECKPOINTS/UNREADABLE/, logging where and why. Inside the
    checkpoints directory, because a rename cannot leave its filesystem (it may be a mount of
    its own)."""
    dst = path.parent / UNREADABLE / f"{path.name}-{int(time.time())}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    storage.rename(path, dst)
    log.warning("moved checkpoint directory %s to %s (%s)", path, dst, reason)


class ReadOnly:
    def __init__(self, directory: str):
        self.ckpt = Checkpointer(directory, read_only=True)

    def __enter__(self) -> Checkpointer:
        return self.ckpt

    def __exit__(self, *exc) -> None:
        self.ckpt._manager.close()


def steps_in(directory: str) -> list[int]:
    if not epath.Path(directory).exists():
        return []
    with ReadOnly(directory) as ckpt:
        return ckpt.steps()
