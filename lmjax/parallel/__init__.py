"""The parallelism floor, the only one that names mesh axes: meshes (ICI and DCN), logical-axis
rules and shardings (`sharding`), and the multi-process start-up (`distributed`).

May import: lmjax.config, lmjax.errors, lmjax.hardware. Re-exports nothing.
"""
