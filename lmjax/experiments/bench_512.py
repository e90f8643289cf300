"""The benchmark shapes compared against MaxText in the README: d_model 512, 8 layers,
8/2 heads x 64, MLP 1408, vocab 32000, seq 512 x batch 8, AdamW.

Defaults suit a CPU (chosen with `lmjax bench --sweep model.dtype=... --sweep model.remat=...
--sweep model.matmul=...`; figures in the README's Benchmarks): bfloat16 compute with
`model.matmul=auto`, so every projection's backward matmuls take row-major operands and stay
in bfloat16 (lmjax/model/matmul.py); `save_dots` remat, which keeps the projection outputs and
recomputes only attention (`full`, MaxText's choice, also recomputes the projections); and a
fused loss over 128-token sequence chunks, so only [batch, 128, vocab] logits exist at a time.
"""

from lmjax.config import Config, DataConfig, MeshConfig, ModelConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=32000,
            d_model=512,
            n_layers=8,
            n_heads=8,
            n_kv_heads=2,
            head_dim=64,
            d_mlp=1408,
            max_seq_len=512,
            dtype="bfloat16",
            remat="save_dots",
            logits_chunk=128,
        ),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(source="synthetic", batch_size=8, seq_len=512),
        run=RunConfig(name="bench_512", steps=100),
    )
