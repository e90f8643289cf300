"""Llama-3 8B shapes: 32 layers x 4096, 32/8 heads, vocab 128256, rope theta 500000.

Data defaults to the packaged corpus; for real pretraining set e.g.
--set data.source=tfds --set data.tfds_name=c4/en:3.1.0 --set data.data_dir=gs://BUCKET/tfds
--set data.tokenizer=gs://BUCKET/tokenizer.model
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=128256,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_mlp=14336,
            max_seq_len=8192,
            rope_theta=500000.0,
            dtype="bfloat16",
            remat="full",
            logits_chunk=1024,
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=128, seq_len=8192),
        optim=OptimConfig(lr=0.0003, warmup_steps=2000),
        run=RunConfig(name="llama3_8b", steps=100000, log_every=10, eval_every=1000),
    )
