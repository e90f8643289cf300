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
  resume    the resume policy: decide_resume and ResumeDecision
  listing   list, load params of and export checkpoints outside training
  schedule  stop signals and the save schedule (independent of the others)

May import: lmjax.config, lmjax.errors, lmjax.parallel, lmjax.model, lmjax.data. Re-exports
nothing: import the module you need.
"""
