"""A tiny model on the packaged corpus, for smoke tests and CI (the fastest experiment)."""

from lmjax.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=512,
            d_model=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            d_mlp=192,
            max_seq_len=128,
            dtype="float32",
        ),
        data=DataConfig(tokenizer_vocab_size=512, batch_size=8, seq_len=64),
        optim=OptimConfig(lr=3e-3, warmup_steps=5, weight_decay=0.0),
        checkpoint=CheckpointConfig(every_steps=10),
        run=RunConfig(name="smoke", steps=20, log_every=5, eval_batches=2),
    )
