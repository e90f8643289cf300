"""The jax versions lmjax is tested with, and whether the installed ones lie inside them.

The ranges live in one place, setup.cfg: `jax`/`jaxlib` in install_requires, `libtpu` in the
test extra, `jax[tpu]`/`jax[cuda12]` in the tpu and gpu extras. `declared_ranges` reads them
from requirement strings; `installed_ranges` from the installed lmjax distribution's metadata
(what pip installed from that setup.cfg). README "Versions" says how to move them.
"""

from __future__ import annotations

import importlib.metadata
from typing import Iterable, Mapping

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

# The packages whose versions the kernels and compiles depend on; each must match its range.
RANGED = ("jax", "jaxlib", "libtpu")
# jax's CUDA plugin is built for one jaxlib; with another, jax may skip it and run on the CPU.
CUDA_PLUGIN = "jax-cuda12-plugin"
MOVE_HINT = (
    "install inside the range (pip install -e '.[gpu]' or '.[tpu]'), or move it (README: Versions)"
)


def declared_ranges(requirements: Iterable[str]) -> dict[str, SpecifierSet]:
    """{package: the intersection of its specifiers} over the `RANGED` packages that
    `requirements` (PEP 508 strings; markers and extras ignored) name."""
    ranges: dict[str, SpecifierSet] = {}
    for line in requirements:
        req = Requirement(line)
        if req.name in RANGED:
            ranges[req.name] = ranges.get(req.name, SpecifierSet()) & req.specifier
    return ranges


def installed_ranges() -> dict[str, SpecifierSet]:
    """The ranges the installed lmjax declares ({} when lmjax is not installed, e.g. run from a
    checkout on PYTHONPATH alone)."""
    try:
        return declared_ranges(importlib.metadata.requires("lmjax") or ())
    except importlib.metadata.PackageNotFoundError:
        return {}


def installed_versions() -> dict[str, str]:
    """{package: version} of the `RANGED` packages and the CUDA plugin that are installed."""
    found = {}
    for name in (*RANGED, CUDA_PLUGIN):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def problems(ranges: Mapping[str, SpecifierSet], versions: Mapping[str, str]) -> list[str]:
    """One sentence per installed package outside its range, and for a CUDA plugin whose
    version differs from jaxlib's; [] when all agree."""
    out = [
        f"{name} {versions[name]} is outside the tested range {name}{spec}: {MOVE_HINT}"
        for name, spec in sorted(ranges.items())
        if name in versions and not spec.contains(versions[name], prereleases=True)
    ]
    plugin, jaxlib = versions.get(CUDA_PLUGIN), versions.get("jaxlib")
    if plugin is not None and plugin != jaxlib:
        out.append(
            f"{CUDA_PLUGIN} {plugin} differs from jaxlib {jaxlib}: jax may skip the GPU and "
            f"run on the CPU; pip install -e '.[gpu]' installs matching versions"
        )
    return out
