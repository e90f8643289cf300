"""The parallelism floor, the only one that names mesh axes: meshes (ICI and DCN), logical-axis
rules and shardings (`sharding`), each process's rows of the batch as global arrays
(`host_rows`), and the multi-process start-up (`distributed`).

May import: lmjax.config, lmjax.errors, lmjax.hardware, lmjax.batch. Re-exports nothing.
"""
