"""Mistral 7B v0.1 shapes (mistralai/Mistral-7B-v0.1 config.json): 32 layers x 4096, 32/8
heads x 128, MLP 14336, vocab 32000, rope theta 10000, a 4096-token sliding window in every
layer.

Data defaults to the packaged corpus; set the data source, tokenizer and batch with --set
(see llama3_8b).
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=32000,
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            d_mlp=14336,
            max_seq_len=32768,
            rope_theta=10000.0,
            norm_eps=1e-5,
            sliding_window=4096,
            dtype="bfloat16",
            remat="full",
            logits_chunk=1024,
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=128, seq_len=8192),
        optim=OptimConfig(lr=0.0003, warmup_steps=2000),
        run=RunConfig(name="mistral_7b", steps=100000, log_every=10, eval_every=1000),
    )
