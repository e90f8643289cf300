"""The observation floor: metrics records and their writers and reader (`metrics`), where wall
time goes (`goodput`), `lmjax report` (`report`) and Weights & Biases (`wandb_log`).

May import: the top-level modules (config, hardware) only; nothing that trains or computes.
Re-exports nothing.
"""
