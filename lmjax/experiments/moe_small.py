"""A small mixture-of-experts model on the packaged corpus, sized to train on a CPU: 8 experts,
2 per token, the first layer dense (its dense twin for `lmjax bench`: model.moe_experts=0,
model.d_mlp=256, the same active MLP width)."""

from lmjax.config import CheckpointConfig, Config, DataConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=512,
            d_model=64,
            n_layers=4,
            n_heads=4,
            n_kv_heads=2,
            head_dim=16,
            d_mlp=256,
            max_seq_len=128,
            dtype="float32",
            remat="none",
            moe_experts=8,
            moe_top_k=2,
            moe_d_mlp=128,
            moe_first_dense_layers=1,
        ),
        data=DataConfig(tokenizer_vocab_size=512, batch_size=8, seq_len=64),
        optim=OptimConfig(
            lr=3e-3, warmup_steps=5, weight_decay=0.0, moe_aux_loss=0.01, moe_router_z_loss=1e-3
        ),
        checkpoint=CheckpointConfig(every_steps=50),
        run=RunConfig(name="moe_small", steps=100, log_every=10, eval_batches=2),
    )
