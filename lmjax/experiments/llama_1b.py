"""Llama-3.2 1B shapes: 16 layers x 2048, 32/8 heads, tied embeddings.

Data defaults to the packaged corpus; for real pretraining set e.g.
--set data.source=tfds --set data.tfds_name=c4/en:3.1.0 --set data.data_dir=gs://BUCKET/tfds
--set data.tokenizer=gs://BUCKET/tokenizer.model
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=128256,
            d_model=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            head_dim=64,
            d_mlp=8192,
            max_seq_len=8192,
            rope_theta=500000.0,
            rope_scaling_factor=32.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_len=8192,
            tie_embeddings=True,
            dtype="bfloat16",
            remat="full",
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=256, seq_len=8192),
        optim=OptimConfig(lr=0.0003, warmup_steps=2000),
        run=RunConfig(name="llama_1b", steps=100000, log_every=10, eval_every=1000),
    )
