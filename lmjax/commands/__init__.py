"""What the `lmjax` subcommands run: each reads a run or an experiment, calls the library, and
prints. Nothing in the library imports these modules; `lmjax.cli` parses arguments and calls
one of them."""
