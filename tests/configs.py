"""The tiny configs that several test modules share, and the `lmjax train` arguments of the
smoke runs. A test that needs another shape says so with `dataclasses.replace` and a comment
naming the reason. Shared configs live here; the few that an integration test borrows from
its unit twin (tests/integration/test_model.py, test_prefill_kernels.py) belong to that one
subject.
"""

import dataclasses

from lmjax.config import CheckpointConfig, Config, DataConfig, ModelConfig, RunConfig

# A float32 Llama small enough to compile in a second: grouped KV heads (4 query heads over 2),
# head_dim * n_heads == d_model, no remat (nothing to save at this size).
TINY_LM = ModelConfig(
    vocab_size=128,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_mlp=64,
    max_seq_len=32,
    dtype="float32",
    remat="none",
)

# The model the evaluation, generation and storage tests compare against tests/numpy_llama.py:
# a vocabulary above the test tokenizer's 300 pieces, room for 64 positions, and the XLA
# attention named rather than resolved (the naive loop's twin on every backend).
SMALL_LM = dataclasses.replace(
    TINY_LM,
    vocab_size=320,
    max_seq_len=64,
    param_dtype="float32",
    attention="xla",
)

# Every dimension a multiple of 8 (d_mlp 192 = 8 * 24), so that each parameter axis can split
# over the 8 CPU devices: the sharding, matmul and plan tests' model.
SPLITTABLE = ModelConfig(
    vocab_size=256,
    d_model=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_mlp=192,
    max_seq_len=64,
    dtype="float32",
)

# A mixture of experts small enough for the float64 numpy loop of tests/numpy_moe.py: 4 layers
# (room for dense-first and every-other patterns), 4 experts of which 2 are active.
TINY_MOE = ModelConfig(
    vocab_size=64,
    d_model=8,
    n_layers=4,
    n_heads=2,
    n_kv_heads=1,
    head_dim=4,
    d_mlp=12,
    max_seq_len=32,
    dtype="float32",
    remat="none",
    moe_experts=4,
    moe_top_k=2,
    moe_d_mlp=6,
)

# The checkpoint tests' run: TINY_LM on synthetic data, keeping the 2 newest steps and every
# third (so that a save prunes, and a milestone survives the pruning).
TINY_RUN = Config(
    model=TINY_LM,
    data=DataConfig(source="synthetic", batch_size=8, seq_len=16),
    checkpoint=CheckpointConfig(keep=2, keep_every=3),
    run=RunConfig(steps=10),
)


def smoke_train_args(steps: int) -> list[str]:
    """`lmjax train` arguments (after the command and its --workdir) of a smoke run of `steps`
    steps that logs every step, checkpoints every 4 and evaluates one batch."""
    return [
        "--experiment",
        "smoke",
        "--set",
        f"run.steps={steps}",
        "--set",
        "run.log_every=1",
        "--set",
        "checkpoint.every_steps=4",
        "--set",
        "run.eval_batches=1",
    ]
