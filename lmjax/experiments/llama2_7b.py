"""Llama-2 7B shapes: 32 layers x 4096, 32 heads (MHA), vocab 32000.

Data defaults to the packaged corpus; for real pretraining set e.g.
--set data.source=tfds --set data.tfds_name=c4/en:3.1.0 --set data.data_dir=gs://BUCKET/tfds
--set data.tokenizer=gs://BUCKET/tokenizer.model
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=32000,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=32,
            head_dim=128,
            d_mlp=11008,
            max_seq_len=4096,
            rope_theta=10000.0,
            dtype="bfloat16",
            remat="full",
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=256, seq_len=4096),
        optim=OptimConfig(lr=0.0003, warmup_steps=2000),
        run=RunConfig(name="llama2_7b", steps=100000, log_every=10, eval_every=1000),
    )
