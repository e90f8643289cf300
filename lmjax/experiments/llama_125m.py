"""GPT-3 Small-sized Llama (125M): 12 layers x 768.

Data defaults to the packaged corpus; for real pretraining set e.g.
--set data.source=tfds --set data.tfds_name=c4/en:3.1.0 --set data.data_dir=gs://BUCKET/tfds
--set data.tokenizer=gs://BUCKET/tokenizer.model
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=32000,
            d_model=768,
            n_layers=12,
            n_heads=12,
            n_kv_heads=12,
            head_dim=64,
            d_mlp=2048,
            max_seq_len=2048,
            rope_theta=10000.0,
            dtype="bfloat16",
            remat="none",
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=256, seq_len=2048),
        optim=OptimConfig(lr=0.0006, warmup_steps=2000),
        run=RunConfig(name="llama_125m", steps=100000, log_every=10, eval_every=1000),
    )
