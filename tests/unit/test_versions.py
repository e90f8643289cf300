"""lmjax.versions: setup.cfg's ranges hold the installed jax, jaxlib and libtpu, every line that
names jax gives the same range, and the check names what lies outside."""

import configparser

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from lmjax import versions
from tests.helpers import REPO

SETUP_CFG = REPO / "setup.cfg"


def setup_cfg_requirements() -> list[str]:
    """Every requirement line of setup.cfg: install_requires and each extra."""
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    values = [cfg["options"]["install_requires"], *cfg["options.extras_require"].values()]
    return [
        line.strip()
        for value in values
        for line in value.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_setup_cfg_ranges_have_a_ceiling_and_hold_the_installed_versions():
    ranges = versions.declared_ranges(setup_cfg_requirements())
    assert set(ranges) == {"jax", "jaxlib", "libtpu"}
    assert all(any(s.operator == "<" for s in spec) for spec in ranges.values()), ranges
    assert versions.problems(ranges, versions.installed_versions()) == []


def test_every_line_naming_jax_gives_one_range():
    """install_requires, the tpu extra and the gpu extra move together."""
    specs = {
        str(Requirement(line).specifier)
        for line in setup_cfg_requirements()
        if Requirement(line).name in ("jax", "jaxlib")
    }
    assert len(specs) == 1, specs
    assert len([r for r in setup_cfg_requirements() if r.startswith("jax[")]) == 2


def test_problems_name_each_package_outside_its_range_and_a_mismatched_cuda_plugin():
    ranges = versions.declared_ranges(["jax>=0.11.2,<0.13", "jax[tpu]>=0.12", "libtpu<0.0.53"])
    assert ranges["jax"] == SpecifierSet(">=0.11.2,<0.13,>=0.12")
    inside = {"jax": "0.12.0.1", "jaxlib": "0.12.0.1", "libtpu": "0.0.52"}
    assert versions.problems(ranges, inside) == []
    found = versions.problems(
        ranges,
        {"jax": "0.13.0", "libtpu": "0.0.60", "jaxlib": "0.13.0", "jax-cuda12-plugin": "0.12.0"},
    )
    assert len(found) == 3
    assert (
        found[0].startswith("jax 0.13.0 is outside the tested range jax") and "README" in found[0]
    )
    assert found[1].startswith("libtpu 0.0.60 is outside")
    assert "jax-cuda12-plugin 0.12.0 differs from jaxlib 0.13.0" in found[2]
    assert "'.[gpu]'" in found[2]
