"""The training floor: the train state and the pure step (`trainer`), the optimizer (`optim`),
the step driver (`loop`), its one-job hooks (`hooks`), one whole run (`run`) and jax's
persistent compilation cache (`compile_cache`).

May import: model, parallel, data, checkpoint, inference, observe and the top-level modules;
never lmjax.tools, lmjax.commands or lmjax.cli. Re-exports nothing.
"""
