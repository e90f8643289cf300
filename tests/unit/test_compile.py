"""Ahead-of-time TPU compiles with libtpu's compile-only devices, and the chunked loss that
keeps full logits out of memory."""

import sys

import pytest

from lmjax import cli, hardware
from lmjax.commands.experiment import load_experiment
from lmjax.config import ConfigError
from lmjax.tools import aot

GiB = 1024**3


@pytest.mark.parametrize(
    "name, topology, chips, hbm_gib",
    [
        ("v5p-8", "v5p:2x2x1", 4, 95),
        ("v5p-64", "v5p:2x4x4", 32, 95),
        ("v5p-128", "v5p:4x4x4", 64, 95),
        ("v5p-512", "v5p:4x8x8", 256, 95),
        ("v4-16", "v4:2x2x2", 8, 32),
        ("v4-256", "v4:4x4x8", 128, 32),
        ("v5litepod-4", "v5e:2x2", 4, 16),
        ("v5litepod-32", "v5e:4x8", 32, 16),
        ("v5e-256", "v5e:16x16", 256, 16),
        ("v6e-8", "v6e:2x4", 8, 32),
        ("v6e-1", "v6e:1x1", 1, 32),
        ("v5p:4x4x12", "v5p:4x4x12", 192, 95),
    ],
)
def test_cloud_names_map_to_topologies(name, topology, chips, hbm_gib):
    target = hardware.parse_target(name)
    assert (target.topology, target.chips, target.generation.hbm_bytes) == (
        topology,
        chips,
        hbm_gib * GiB,
    )


@pytest.mark.parametrize(
    "name, message",
    [
        ("v5p-127", "N must be even"),
        ("v5p-24", "only power-of-two slices"),
        ("v7-8", "expected a Cloud TPU name"),
        ("v5e:2x2x2", "v5e topologies have 2 dimensions"),
        ("tpu", "expected a Cloud TPU name"),
    ],
)
def test_bad_topology_names_say_what_is_expected(name, message):
    with pytest.raises(ConfigError, match=message):
        hardware.parse_target(name)


def test_missing_libtpu_names_the_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if not installed
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'lmjax\[tpu\]'"):
        aot.require_libtpu()
    assert cli.main(["compile", "--experiment", "smoke", "--topology", "v5e-4"]) == 2
    assert "needs libtpu" in capsys.readouterr().err


def test_logits_chunk_must_divide_the_sequence():
    with pytest.raises(
        ConfigError, match="model.logits_chunk=48 must be 0 .off. or divide data.seq_len=64"
    ):
        load_experiment("smoke", ["model.logits_chunk=48"])
