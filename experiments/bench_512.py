"""The benchmark shapes compared against MaxText in the README: d_model 512, 8 layers,
8/2 heads x 64, MLP 1408, vocab 32000, seq 512 x batch 8, AdamW.

Defaults are the fastest in the README's sweep on a 2-core CPU (`lmjax bench --sweep
model.dtype=... --sweep model.remat=... --sweep model.matmul=...`; the figures are in the README):
bfloat16 compute with `model.matmul=auto`, which on the CPU gives every projection row-major
backward matmuls so that all of them run at XLA:CPU's bfloat16 speed (lmjax/matmul.py; with
plain autodiff the transposed gradient matmuls fall back to float32 and bfloat16 is slower
than float32); `save_dots` remat, which keeps the projection outputs and recomputes only
attention (`full`, MaxText's choice, also recomputes the projections; `none` stores every
layer's score tensors, which costs more than recomputing them); and a fused loss over 128-token
sequence chunks, whose logits stay cache-sized.
"""
from lmjax.config import Config, DataConfig, ModelConfig, MeshConfig, RunConfig


def config() -> Config:
    return Config(
        model=ModelConfig(vocab_size=32000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                          head_dim=64, d_mlp=1408, max_seq_len=512, dtype="bfloat16",
                          remat="save_dots", logits_chunk=128),
        mesh=MeshConfig(fsdp=-1),
        data=DataConfig(source="synthetic", batch_size=8, seq_len=512),
        run=RunConfig(name="bench_512", steps=100),
    )
