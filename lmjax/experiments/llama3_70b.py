"""Llama-3 70B shapes: 80 layers x 8192, 64/8 heads, MLP 28672, vocab 128256.

Data defaults to the packaged corpus; for real pretraining set e.g.
--set data.source=tfds --set data.tfds_name=c4/en:3.1.0 --set data.data_dir=gs://BUCKET/tfds
--set data.tokenizer=gs://BUCKET/tokenizer.model
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=128256,
            d_model=8192,
            n_layers=80,
            n_heads=64,
            n_kv_heads=8,
            head_dim=128,
            d_mlp=28672,
            max_seq_len=8192,
            rope_theta=500000.0,
            dtype="bfloat16",
            remat="full",
            logits_chunk=1024,
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=512, seq_len=8192),
        optim=OptimConfig(lr=0.00015, warmup_steps=2000),
        run=RunConfig(name="llama3_70b", steps=100000, log_every=10, eval_every=1000),
    )
