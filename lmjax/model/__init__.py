"""The model floor: what a decoder-only transformer computes from its params and a batch.

`transformer` (init, forward, the one parameter table), `attention` (one entry point over the
XLA, Pallas, cuDNN and splash kernels), `matmul` (projections with row-major backward matmuls),
`cross_entropy` (the fused chunked loss), `objective` (the loss terms of a batch), `flops`
(FLOPs per token, and what remat recomputes).

May import: lmjax.config, lmjax.batch, lmjax.hardware and lmjax.parallel.sharding (activation
constraints by logical axis name); never a mesh axis name, never training or data. Re-exports
nothing: import the module you need.
"""
