"""What `--experiment NAME --set KEY=VALUE` means to every command that takes them: the
folders presets are found in, the Config a name or a path gives, and the default workdir of
the data commands."""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

from lmjax import storage
from lmjax.config import Config, ConfigError
from lmjax.config_checks import validate
from lmjax.config_overrides import apply_overrides

# ./experiments/ of the working directory first, so that a user's preset of the same name wins
# over the one shipped inside the package.
EXPERIMENT_DIRS = (
    Path.cwd() / "experiments",
    Path(__file__).resolve().parent.parent / "experiments",
)


def experiment_names() -> list[str]:
    """Every preset name in EXPERIMENT_DIRS, sorted (files starting with `_` are not presets)."""
    names: set[str] = set()
    for d in EXPERIMENT_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.py") if not p.stem.startswith("_"))
    return sorted(names)


def load_experiment(name_or_path: str, overrides: Sequence[str] = ()) -> Config:
    """The Config returned by `config()` in experiments/NAME.py (or a path, local or gs://),
    with overrides."""
    if storage.is_url(name_or_path):  # Python imports local files only: a copy is imported
        if not storage.path(name_or_path).is_file():
            raise ConfigError(f"experiment file {name_or_path!r} does not exist")
        with storage.local_copy(name_or_path) as local:
            return load_experiment(local, overrides)
    path = Path(name_or_path)  # a preset name or a local file
    if path.suffix != ".py":
        preset = next(
            (
                d / f"{name_or_path}.py"
                for d in EXPERIMENT_DIRS
                if (d / f"{name_or_path}.py").is_file()
            ),
            None,
        )
        if preset is None:
            raise ConfigError(
                f"unknown experiment {name_or_path!r}; known: "
                f"{', '.join(experiment_names())} (or give a path to a .py file)"
            )
        path = preset
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"lmjax_experiment_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"experiment file {str(path)!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"experiment {str(path)!r} must define config() -> lmjax.config.Config")
    return validate(apply_overrides(module.config(), list(overrides)))


def add_arguments(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """--experiment (required unless `default`) and the repeatable --set KEY=VALUE."""
    p.add_argument(
        "--experiment",
        default=default,
        required=default is None,
        help="experiment name in experiments/ or a path to a .py file",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set run.steps=100 (repeatable)",
    )


def data_workdir(workdir: str, config: Config) -> str:
    """The data commands' run directory: `workdir`, or ~/.cache/lmjax/RUN_NAME."""
    return workdir or os.path.join(os.path.expanduser("~/.cache/lmjax"), config.run.name)
