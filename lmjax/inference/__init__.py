"""The inference floor: the one evaluator (`evaluate`), KV-cache decoding (`generate`) and a
saved run read back for both (`saved_run`).

May import: model, parallel, data, checkpoint and the top-level modules; never training,
tools or the command layer. Re-exports nothing.
"""
