"""The observation floor: metrics records and their writers and reader (`metrics`), tokens/s, MFU
and memory (`throughput`), where wall time goes (`goodput`), `lmjax report` (`report`) and
Weights & Biases (`wandb_log`).

May import: lmjax.model.flops (FLOPs per token) and the top-level modules; nothing that trains.
Re-exports nothing.
"""
