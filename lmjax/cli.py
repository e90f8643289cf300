"""`lmjax` command line: parses arguments and calls one function per subcommand."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from lmjax.config import Config, ConfigError, apply_overrides, validate

EXPERIMENT_DIRS = (Path.cwd() / "experiments", Path(__file__).resolve().parent.parent / "experiments")


def experiment_names() -> list[str]:
    names = set()
    for d in EXPERIMENT_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.py") if not p.stem.startswith("_"))
    return sorted(names)


def load_experiment(name_or_path: str, overrides: list[str] = ()) -> Config:
    """The Config returned by `config()` in experiments/NAME.py (or a path), with overrides."""
    path = Path(name_or_path)
    if path.suffix != ".py":
        path = next((d / f"{name_or_path}.py" for d in EXPERIMENT_DIRS
                     if (d / f"{name_or_path}.py").is_file()), None)
        if path is None:
            raise ConfigError(f"unknown experiment {name_or_path!r}; known: "
                              f"{', '.join(experiment_names())} (or give a path to a .py file)")
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"lmjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"experiment {str(path)!r} must define config() -> lmjax.config.Config")
    return validate(apply_overrides(module.config(), list(overrides)))


def _add_experiment_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--experiment", default=default, required=default is None,
                   help="experiment name in experiments/ or a path to a .py file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set run.steps=100 (repeatable)")


def _cmd_train(args) -> int:
    from lmjax import distributed, train
    distributed.initialize()
    config = load_experiment(args.experiment, args.overrides)
    result = train.train(config, args.workdir)
    print(" ".join(f"{k}={v:.4g}" for k, v in result.items() if k.startswith(("loss", "eval"))))
    return 0


def _cmd_bench(args) -> int:
    from lmjax import bench
    config = load_experiment(args.experiment, args.overrides)
    bench.main(config, sweeps=args.sweep, steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmjax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) an experiment in a workdir")
    _add_experiment_args(p)
    p.add_argument("--workdir", required=True, help="run directory (local or gs://)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("bench", help="time the train step on synthetic data and print a table")
    _add_experiment_args(p, default="bench_512")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="run once per value and compare in one table (repeatable: a grid)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"lmjax: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
