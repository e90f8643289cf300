"""Qwen3 8B shapes (Qwen/Qwen3-8B config.json): 36 layers x 4096, 32/8 heads x 128, MLP 12288,
vocab 151936, QK-norm, rope theta 1e6, untied embeddings.

Data defaults to the packaged corpus; set the data source, tokenizer and batch with --set
(see llama3_8b).
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=151936,
            d_model=4096,
            n_layers=36,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_mlp=12288,
            max_seq_len=40960,
            rope_theta=1_000_000.0,
            norm_eps=1e-6,
            qk_norm=True,
            dtype="bfloat16",
            remat="full",
            logits_chunk=1024,
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=128, seq_len=8192),
        optim=OptimConfig(lr=0.0003, warmup_steps=2000),
        run=RunConfig(name="qwen3_8b", steps=100000, log_every=10, eval_every=1000),
    )
