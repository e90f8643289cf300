"""`lmjax plan`: which mesh, per-chip batch and remat policy fit a TPU slice, and which is
fastest. One job a module, in the order a plan runs:

- candidates: the space (`DEFAULT_SPACE`, each dimension replaceable with `--sweep KEY=V1,V2`,
  which also adds any other config field): the ICI mesh (data x fsdp x expert x tensor, fsdp
  taking the chips left), the split of `--num-slices` between DCN data and DCN fsdp, sequences
  per chip, remat policy and gradient accumulation; the points the model's shapes or the mesh
  cannot divide are rejected before any compile, with the reason.
- workers: the rest compiled ahead of time for the target in worker processes
  (`aot.compile_train_step`, the real train step), each with a timeout; a candidate that
  fails is reported with its error, never fatal.
- rank: memory per chip from the compiler and a step time from `roofline.py`; the ranked
  table and the JSON report.
- budget: a run's length at the best step, and a compute-optimal size for a chip-hour budget.
- search: `plan(config, Request)`, all of the above for one request.

May import: what lmjax.tools may. Re-exports nothing.
"""
