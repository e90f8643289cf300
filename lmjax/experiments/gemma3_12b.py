"""Gemma 3 12B shapes (google/gemma-3-12b-pt text_config): 48 layers x 3840, 16/8 heads x 256,
GeGLU MLP 15360, vocab 262208 (tied), QK-norm, (1 + w) norms before and after each sublayer,
embeddings times sqrt(3840); five local layers (1024-token window, rope base 10000) before
every global one (rope base 1e6, linear scaling 8), scores scaled by 256**-0.5.

Data defaults to the packaged corpus; set the data source, tokenizer and batch with --set
(see llama3_8b).
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=262208,
            d_model=3840,
            n_layers=48,
            n_heads=16,
            n_kv_heads=8,
            head_dim=256,
            d_mlp=15360,
            max_seq_len=131072,
            rope_theta=1_000_000.0,
            rope_scaling_type="linear",
            rope_scaling_factor=8.0,
            norm_eps=1e-6,
            tie_embeddings=True,
            qk_norm=True,
            norm_offset=True,
            scale_embeddings=True,
            mlp_activation="gelu_tanh",
            post_norms=True,
            sliding_window=1024,
            global_every=6,
            rope_local_theta=10000.0,
            query_pre_attn_scalar=256.0,
            dtype="bfloat16",
            remat="full",
            logits_chunk=1024,
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=128, seq_len=8192),
        optim=OptimConfig(lr=0.0003, warmup_steps=2000),
        run=RunConfig(name="gemma3_12b", steps=100000, log_every=10, eval_every=1000),
    )
