"""The presets, installed with the package: one module a named experiment, each defining
`config() -> lmjax.config.Config`. `lmjax train --experiment NAME` loads `NAME.py` from here
(or from `./experiments/` of the working directory, or a path to a .py file).

May import: lmjax.config only (a preset is data). Re-exports nothing.
"""
