"""Resume policy: where a run's state comes from (`decide_resume`) and how it is loaded
(`ResumeDecision.load`): newest readable checkpoint first, damage skipped, anything else stops."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lmjax.checkpoint import params_dir
from lmjax.checkpoint.checkpointer import (
    ReadOnly,
    TornCheckpoint,
    abstract_state,
    classify,
    damage_evidence,
    retrying,
    step_dirs,
    steps_in,
)
from lmjax.checkpoint.compat import (
    ResumeError,
    StructureMismatch,
    check_init_tokenizer,
    check_resumable,
    check_tokenizer,
    model_diff,
    refused_fields,
)
from lmjax.checkpoint.paths import absolute, checkpoint_dir
from lmjax.config import Config, ConfigError
from lmjax.errors import FaultError
from lmjax.workdir_names import CHECKPOINTS, UNREADABLE

log = logging.getLogger("lmjax")


def decide_resume(
    workdir: str, config: Config, *, restore_from: str | None = None, init_from: str | None = None
) -> ResumeDecision:
    """Decides where the state comes from; reads only metadata.

    - the workdir has checkpoints: resume from the newest readable one (the flags are then
      ignored, so the same command line resumes a preempted run), unless `restore_from` is a
      step number of this workdir (a path is then ignored, with a warning);
    - `restore_from`: a step number, a checkpoints directory (its newest step) or one step
      directory `.../checkpoints/STEP`;
    - `init_from`: a params-only directory (`lmjax checkpoint export`, `lmjax convert from-hf`);
    - otherwise a fresh start.
    Raises ResumeError on a refused config change or when checkpoints exist but none is readable.
    """
    if restore_from and init_from:
        raise ResumeError(
            "--restore-from and --init-from exclude each other: the first "
            "continues a run (state, optimizer, data position), the second only "
            "loads parameters."
        )
    own = checkpoint_dir(workdir)
    own_steps = steps_in(own)
    directory, steps = _source(own, own_steps, restore_from)
    if steps and init_from:
        log.warning(
            "ignoring --init-from %s: resuming from the checkpoints in %s", init_from, directory
        )
        init_from = None
    if init_from and not steps:
        _check_init_from(init_from, config.model)
    _refuse_later_steps(own, own_steps, directory, steps)
    _refuse_torn_only(own, steps, config)
    decision = ResumeDecision([], init_from, allow_fresh=config.checkpoint.allow_fresh)
    decision.candidates = (
        _read_candidates(directory, steps, config, decision.unreadable) if steps else []
    )
    if steps and not decision.candidates and not decision.allow_fresh:
        raise ResumeError(
            f"checkpoints {steps} exist in {directory} but none has readable "
            "metadata. Nothing was moved or deleted. Fix: restore them, or start "
            "over with --set checkpoint.allow_fresh=true."
        )
    return decision


def _source(own: str, own_steps: list[int], restore_from: str | None) -> tuple[str, list[int]]:
    """(checkpoints directory, steps to try): the workdir's own checkpoints `own` come first;
    `restore_from` counts when it names one of their steps or when there are none."""
    if restore_from is not None and restore_from.strip().isdigit():
        step = int(restore_from)
        if step not in own_steps:
            raise ResumeError(
                f"--restore-from {step}: {own} has no committed step {step} "
                f"(it has {own_steps or 'none'})."
            )
        return own, [step]
    if restore_from is not None and not own_steps:
        return _parse_checkpoint_path(restore_from)
    if restore_from is not None:
        log.warning(
            "%s already has checkpoints %s: resuming from them, not from --restore-from %s",
            own,
            own_steps,
            restore_from,
        )
    return own, own_steps


def _parse_checkpoint_path(path: str) -> tuple[str, list[int]]:
    """(checkpoints directory, steps to try) for a `--restore-from` path."""
    p = epath.Path(absolute(path))
    if (p / "meta").exists() and p.name.isdigit():
        return str(p.parent), [int(p.name)]
    for root in (p, p / CHECKPOINTS):
        steps = steps_in(str(root)) if root.exists() else []
        if steps:
            return str(root), steps
    raise ResumeError(
        f"--restore-from {path}: no committed checkpoint there. Give a workdir, "
        "its checkpoints/ directory, one checkpoints/STEP directory, or a step "
        "number of this workdir."
    )


def _refuse_later_steps(own: str, own_steps: list[int], directory: str, steps: list[int]) -> None:
    """Restoring an older step of the workdir itself: later steps would collide with new saves."""
    later = [s for s in own_steps if steps and directory == own and s > max(steps)]
    if later:
        raise ResumeError(
            f"--restore-from step {max(steps)}: {own} also has later steps {later}, "
            "which new saves would collide with. Fix: move them away, or restore "
            "into a new workdir with --restore-from "
            f"{os.path.join(own, str(max(steps)))}."
        )


def _refuse_torn_only(own: str, steps: list[int], config: Config) -> None:
    """Step directories but no committed step: torn saves are not a fresh start unless
    checkpoint.allow_fresh says so."""
    uncommitted = [p.name for p, _ in step_dirs(own) if p.name.isdigit()]
    if not steps and uncommitted and not config.checkpoint.allow_fresh:
        raise ResumeError(
            f"{own} has step directories {uncommitted} but none is committed "
            "(torn saves). Nothing was moved or deleted. Fix: restore them, or "
            "start over with --set checkpoint.allow_fresh=true."
        )


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
class ResumeDecision:
    """Where a run's state comes from: checkpoints to try newest first, or params to load, or
    nothing (a fresh start). Built by `decide_resume` before any expensive work.

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

    def load(
        self, init_fn: Callable, shardings, workdir: str, model_cfg
    ) -> tuple[Any, dict | None, str]:
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
            listing = "; ".join(
                f"step {s}: {e.splitlines()[0][:200]}" for _, s, e in self.unreadable
            )
            raise ResumeError(
                f"checkpoints exist but none could be read ({listing}). Nothing was "
                "moved or deleted. Fix: restore them, point --restore-from at a "
                "readable checkpoint, or start over with --set "
                "checkpoint.allow_fresh=true (the first save then moves them to "
                f"{os.path.join(checkpoint_dir(workdir), UNREADABLE)}/)."
            )
        if self.unreadable:
            log.warning(
                "checkpoint.allow_fresh: starting from scratch although steps %s exist "
                "(unreadable)",
                [s for _, s, _ in self.unreadable],
            )
        state = init_fn()
        if self.init_from is None:
            return state, None, "fresh init"
        return self._with_init_params(state, target, self.init_from)

    def _restore(self, c: Candidate, target) -> tuple[Any, dict] | None:
        """(state, data position), or None when `c` is torn on some process."""
        result, outcome = None, "ok"
        error: Exception | None = None
        try:
            evidence = damage_evidence(os.path.join(c.directory, str(c.step)))
            if evidence:
                raise TornCheckpoint(evidence)
            with ReadOnly(c.directory) as ckpt:
                result = retrying(f"restoring {c.where}", lambda: ckpt.restore(c.step, target))
        except StructureMismatch as e:
            outcome, error = "refused", e
        except Exception as e:  # classified below; not damage means stop
            outcome, error = ("torn" if classify(e) == "damage" else "failed"), e
        outcome = _worst(outcome)
        if outcome == "ok":
            return result
        if outcome == "torn":
            text = f"{type(error).__name__}: {error}" if error else "torn on another process"
            log.error(
                "checkpoint %s is unreadable (%s); trying the previous one",
                c.where,
                text.splitlines()[0][:300],
            )
            self.unreadable.append((c.directory, c.step, text))
            return None
        raise _stop_error(c, error)

    def _with_init_params(self, state, target, init_from: str) -> tuple[Any, None, str]:
        # Restored onto training's shardings: each process reads only its own shards.
        _, params = params_dir.load(init_from, target.params)
        log.info("initialized params from %s", init_from)
        return state.replace(params=params), None, f"params from {init_from}"


def _check_init_from(init_from: str, model_cfg) -> None:
    """Refuses `--init-from` params that are missing or do not fit `model_cfg` (reads only
    their config)."""
    diff = model_diff(params_dir.read_config(init_from), model_cfg)
    changes = {k: diff[k] for k in refused_fields(diff)}
    if changes:
        lines = "\n  ".join(f"{k}: params {a!r}, config {b!r}" for k, (a, b) in changes.items())
        raise ResumeError(
            f"--init-from {init_from} does not fit this model:\n  {lines}\n"
            "Fix: set those model fields to the params' values."
        )


def _stop_error(c: Candidate, error: BaseException | None) -> Exception:
    """The error that stops a resume which failed for a reason other than damage."""
    untouched = "No checkpoint was moved or deleted."
    if error is None:
        return FaultError(f"another process could not restore {c.where} (see its log). {untouched}")
    if isinstance(error, StructureMismatch):
        fields = (
            "; ".join(
                f"{k}: {a!r} -> {b!r}"
                for k, (a, b) in sorted(c.changes.items())
                if k.startswith("optim.")
            )
            or "no optim field (another lmjax version?)"
        )
        return ResumeError(
            f"cannot resume {c.where}: {error}. Changed since it was saved: "
            f"{fields}. Fix: resume with the checkpoint's values (--set "
            "FIELD=VALUE), or start a new workdir from its params (lmjax "
            f"checkpoint export, then --init-from). {untouched}"
        )
    if classify(error) == "oom":
        return ResumeError(
            f"out of memory restoring {c.where} on this mesh "
            f"({str(error).splitlines()[0][:200]}). {untouched} Fix: more "
            "devices or processes, or shard the state wider (mesh.fsdp)."
        )
    if isinstance(error, (ConfigError, FaultError)):
        return error
    return FaultError(
        f"restoring {c.where} failed: {type(error).__name__}: "
        f"{str(error).splitlines()[0][:300] if str(error) else ''}. {untouched} "
        "Rerun with -v for the traceback."
    )


def _worst(outcome: str) -> str:
    """The worst of every process's `outcome` (OUTCOMES order)."""
    if jax.process_count() == 1:
        return outcome
    codes = multihost_utils.process_allgather(np.array(OUTCOMES.index(outcome), np.int32))
    return OUTCOMES[int(np.max(codes))]


def _read_candidates(
    directory: str, steps: list[int], config: Config, unreadable: list
) -> list[Candidate]:
    """Newest first, those whose metadata reads; refuses (raises) on a changed model."""
    out: list[Candidate] = []
    with ReadOnly(directory) as ckpt:
        for step in sorted(steps, reverse=True):
            try:
                meta = retrying(
                    f"reading {directory} step {step}",
                    functools.partial(ckpt.read_json, step, "meta"),
                )
            except FaultError:
                raise
            except Exception as e:  # unreadable metadata is damage
                log.error(
                    "checkpoint %s step %d: metadata unreadable (%s)",
                    directory,
                    step,
                    str(e).splitlines()[0][:300],
                )
                unreadable.append((directory, step, f"metadata: {e}"))
                continue
            changes = check_resumable(meta, config, f"{directory} step {step}")
            if not out:
                for k, (a, b) in sorted(changes.items()):
                    log.warning("resuming with a changed config: %s: %r -> %r", k, a, b)
            out.append(Candidate(directory, step, meta, changes))
    return out


def describe_resume(step: int, source: str) -> dict:
    """The record that marks where a run (re)started."""
    return {"event": "start", "restored_step": step, "restored_from": source}
