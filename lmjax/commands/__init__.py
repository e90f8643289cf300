"""The `lmjax` subcommands, one module each: `add_parser` (its arguments), `*from_args` (the
parsed arguments to a call) and the functions that read a run or an experiment, call the
library and print. `experiment` holds what `--experiment NAME --set KEY=VALUE` means to all of
them, `watch` the offline commands' `--watchdog-seconds`. Nothing in the library imports
these modules; `lmjax.cli` builds the parser from them and runs the chosen command.

May import: the top-level modules (config, storage, batch, ...) at the top; every floor, but
only inside the functions that run a command, so that building the parser, as `lmjax --help`
does, loads neither jax nor TensorFlow (tests/unit/test_imports.py checks both). Re-exports
nothing.
"""
