"""Mixtral 8x7B shapes (mistralai/Mixtral-8x7B-v0.1 config.json): 32 layers x 4096, 32/8 heads
x 128, 8 SwiGLU experts of 14336 in every layer, 2 per token with renormalized weights
(softmax_topk_renorm), vocab 32000, rope theta 1e6, no sliding window, router aux loss 0.02.
Dropless dispatch; `--set mesh.expert=8` splits the experts over 8 devices.

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
            rope_theta=1_000_000.0,
            norm_eps=1e-5,
            dtype="bfloat16",
            remat="full",
            logits_chunk=1024,
            moe_experts=8,
            moe_top_k=2,
            moe_router="softmax_topk_renorm",
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=128, seq_len=4096),
        optim=OptimConfig(lr=0.0003, warmup_steps=2000, moe_aux_loss=0.02),
        run=RunConfig(name="mixtral_8x7b", steps=100000, log_every=10, eval_every=1000),
    )
