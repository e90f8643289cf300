"""Every name a run writes into its workdir (`WORKDIR/NAME`), in one place, so that a reader
sees the whole layout at once and two modules never pick the same name.

  config.json        the resolved config of the run, written once its resume succeeded
  metrics/           JSONL objects START-CHUNK.jsonl, one record a line (observe.metrics)
  metrics.jsonl      the records of runs begun before metrics/, read before it
  tensorboard/       TensorBoard event files; jax.profiler writes profiles into its plugins/profile/
  wandb_run_id       the W&B run every restart logs into
  wandb/             W&B's offline files (for a gs:// workdir, copied there when the run ends)
  report.png         `lmjax report`'s plot (unless --png says otherwise)
  tokenizer.model    the tokenizer a run without data.tokenizer trains on first use
  data/              prepared stores when data.store_dir is unset
  data_stores.json   the stores the run reads, found once (data.prepare)
  lease(/)           the run that holds the workdir, renewed while it lives (checkpoint.lease):
                     a directory of generation files locally, one object on gs://
  checkpoints/       orbax step directories; checkpoints/unreadable/ holds steps set aside
"""

CONFIG = "config.json"
METRICS = "metrics"
LEGACY_METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
WANDB_RUN_ID = "wandb_run_id"
WANDB = "wandb"  # also the folder name wandb itself gives its files under its `dir`
REPORT = "report.png"
TOKENIZER = "tokenizer.model"
DATA = "data"
STORE_RECORD = "data_stores.json"
LEASE = "lease"
CHECKPOINTS = "checkpoints"
# CHECKPOINTS/UNREADABLE/: steps set aside (no step number, so orbax never reads it as one)
UNREADABLE = "unreadable"
