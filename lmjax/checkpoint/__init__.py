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

Modules, each importing only those above it:
  paths     names of the checkpoint directories and items
  compat    metadata, and which config, tokenizer and optimizer-layout changes a resume accepts
  checkpointer  orbax I/O: the Checkpointer, finiteness before a save, storage faults and retries
  resume    the resume policy: plan_resume and ResumePlan
  listing   list, load params of and export checkpoints outside training
  schedule  stop signals and the save schedule (independent of the others)
"""

from lmjax.checkpoint.checkpointer import Checkpointer, TornCheckpoint, abstract_state, classify
from lmjax.checkpoint.compat import (
    TOKENIZER_RECORD,
    ResumeError,
    StructureMismatch,
    check_init_tokenizer,
    check_resumable,
    check_tokenizer,
    config_fingerprint,
    make_metadata,
)
from lmjax.checkpoint.listing import (
    export_params,
    format_listing,
    json_summary,
    list_checkpoints,
    load_params,
)
from lmjax.checkpoint.paths import CHECKPOINTS, UNREADABLE, absolute, checkpoint_dir
from lmjax.checkpoint.resume import ResumePlan, describe_resume, plan_resume
from lmjax.checkpoint.schedule import SaveSchedule, StopSignals
from lmjax.errors import FaultError

__all__ = [
    "CHECKPOINTS",
    "UNREADABLE",
    "TOKENIZER_RECORD",
    "Checkpointer",
    "FaultError",
    "ResumeError",
    "ResumePlan",
    "SaveSchedule",
    "StopSignals",
    "StructureMismatch",
    "TornCheckpoint",
    "abstract_state",
    "absolute",
    "check_init_tokenizer",
    "check_resumable",
    "check_tokenizer",
    "checkpoint_dir",
    "classify",
    "config_fingerprint",
    "describe_resume",
    "export_params",
    "format_listing",
    "json_summary",
    "list_checkpoints",
    "load_params",
    "make_metadata",
    "plan_resume",
]
