"""`lmjax` command line: builds the parser from each command's own (lmjax/commands/NAME.py:
`add_parser`), runs the chosen command, and turns the errors a user can fix into one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lmjax import storage
from lmjax.commands import (
    aot,
    bench,
    checkpoint,
    convert,
    data,
    doctor,
    evaluate,
    generate,
    plan,
    report,
    smoke,
    soak,
    tokenizer,
    train,
)
from lmjax.config import ConfigError
from lmjax.errors import FaultError

# In the order `lmjax --help` lists them. Each command module loads its library floors only when
# it runs, so building this parser loads neither jax nor TensorFlow.
COMMANDS = (
    train,
    smoke,
    doctor,
    checkpoint,
    convert,
    bench,
    report,
    evaluate,
    generate,
    aot,
    plan,
    data,
    soak,
    tokenizer,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmjax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    storage.follow_emulator()  # before any command creates a Cloud Storage client
    if not args.verbose:  # orbax and tfds log every file operation at INFO
        logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except ConfigError as e:  # the user's mistake; anything else is a bug
        if args.verbose:
            raise
        print(f"lmjax: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, FaultError) as e:
        if args.verbose:
            raise
        print(f"lmjax: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
