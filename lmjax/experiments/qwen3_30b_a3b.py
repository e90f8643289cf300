"""Qwen3-30B-A3B shapes (Qwen/Qwen3-30B-A3B config.json): 48 layers x 2048, 32/4 heads x 128,
QK-norm, 128 SwiGLU experts of 768 in every layer, 8 per token with renormalized weights
(norm_topk_prob: softmax_topk_renorm), vocab 151936, rope theta 1e6, untied embeddings,
router aux loss 0.001. Dropless dispatch; `--set mesh.expert=N` splits the experts.

Data defaults to the packaged corpus; set the data source, tokenizer and batch with --set
(see llama3_8b).
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, OptimConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=151936,
            d_model=2048,
            n_layers=48,
            n_heads=32,
            n_kv_heads=4,
            head_dim=128,
            d_mlp=6144,
            max_seq_len=40960,
            rope_theta=1_000_000.0,
            norm_eps=1e-6,
            qk_norm=True,
            dtype="bfloat16",
            remat="full",
            logits_chunk=1024,
            moe_experts=128,
            moe_top_k=8,
            moe_router="softmax_topk_renorm",
            moe_d_mlp=768,
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(batch_size=128, seq_len=8192),
        optim=OptimConfig(lr=0.0003, warmup_steps=2000, moe_aux_loss=0.001),
        run=RunConfig(name="qwen3_30b_a3b", steps=100000, log_every=10, eval_every=1000),
    )
