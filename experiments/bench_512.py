"""The benchmark shapes compared against MaxText in the README: d_model 512, 8 layers,
8/2 heads x 64, MLP 1408, vocab 32000, seq 512 x batch 8, AdamW."""
from lmjax.config import Config, DataConfig, ModelConfig, MeshConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                          head_dim=64, d_mlp=1408, max_seq_len=512, dtype="bfloat16",
                          remat="full"),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(source="synthetic", batch_size=8, seq_len=512),
        run=RunConfig(name="bench_512", steps=100),
    )
