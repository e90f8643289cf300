"""The README run: a small Llama on the packaged Shakespeare slice, sized to train on a CPU."""

from lmjax.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=2048,
            d_model=256,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            head_dim=64,
            d_mlp=704,
            max_seq_len=256,
            remat="none",
        ),
        data=DataConfig(tokenizer_vocab_size=2048, batch_size=16, seq_len=256),
        optim=OptimConfig(lr=2e-3, warmup_steps=20, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=200),
        run=RunConfig(
            name="quickstart",
            steps=400,
            log_every=20,
            eval_every=200,
            eval_batches=4,
            sample_tokens=48,
        ),
    )
