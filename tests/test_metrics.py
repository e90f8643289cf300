"""Peak FLOP/s for MFU: the right chip variant, and the float32 peak for float32 compute;
metrics.jsonl read back as MetricsWriter wrote it."""

import types

import pytest

from lmjax.config import ConfigError
from lmjax.observe import goodput, metrics, report, throughput
from lmjax.workdir_names import METRICS


def _device(kind, platform):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
    "kind, dtype, peak, says",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12, "16-bit"),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12, "16-bit"),
        ("NVIDIA H100 NVL", "bfloat16", 835e12, "16-bit"),
        ("NVIDIA H100 PCIe", "float32", 378e12, "TF32"),
        ("NVIDIA A100-SXM4-80GB", "float32", 156e12, "TF32"),
        ("NVIDIA A100-PCIE-40GB", "bfloat16", 312e12, "16-bit"),
    ],
)
def test_gpu_peaks_by_variant_and_dtype(kind, dtype, peak, says):
    got, source = throughput.peak_flops(_device(kind, "gpu"), dtype)
    assert got == peak and kind in source and says in source


def test_unknown_h100_variant_has_no_peak_and_tpu_float32_is_the_bf16_rate():
    got, source = throughput.peak_flops(_device("NVIDIA H100", "gpu"))
    assert got != got  # NaN: no guess from another variant
    assert "unknown device kind" in source
    assert throughput.peak_flops(_device("TPU v5p", "tpu"), "float32") == (
        459e12,
        "table (TPU v5p, float32 matmuls as bf16 passes at default precision)",
    )


def test_read_records_gives_every_start_in_order_and_skips_a_torn_last_line(tmp_path):
    first = metrics.MetricsWriter(str(tmp_path), total_steps=3)
    first.write(1, {"loss": 2.5}, progress=False)
    first.write(2, {"loss": 2.25, "note": "x"}, progress=False)
    first.close(final=lambda: (2, {"event": "end"}))
    second = metrics.MetricsWriter(str(tmp_path), total_steps=3, start_step=2)  # a restart
    second.write(3, {"loss": 2.0}, progress=False)
    second.close()
    written = [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 2.25, "note": "x"},
        {"step": 2, "event": "end"},
        {"step": 3, "loss": 2.0},
    ]
    assert metrics.read_records(tmp_path) == written
    with open(tmp_path / METRICS, "a") as f:
        f.write('{"step": 4, "lo')  # a process killed in the middle of a write
    assert metrics.read_records(str(tmp_path)) == written
    assert report.load(str(tmp_path)) == written
    assert goodput.last_reached_step(str(tmp_path)) == 3


def test_a_missing_metrics_file_is_an_error_unless_allowed(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        metrics.read_records(tmp_path)
    assert metrics.read_records(tmp_path, missing_ok=True) == []
    assert goodput.last_reached_step(str(tmp_path)) == 0
    with pytest.raises(ConfigError, match="metrics.jsonl does not exist: give the --workdir"):
        report.load(str(tmp_path))


@pytest.mark.parametrize("torn", ['{"step": 4, "lo', "x" * 10000])
def test_a_restart_after_a_torn_write_cuts_the_torn_record_and_appends_cleanly(tmp_path, torn):
    """Without the cut, the restart's first record would be glued onto the torn one and leave
    an unreadable line in the middle of the file (a torn record may span several blocks)."""
    first = metrics.MetricsWriter(str(tmp_path), total_steps=4)
    first.write(1, {"loss": 2.5}, progress=False)
    first.close()
    with open(tmp_path / METRICS, "a") as f:
        f.write(torn)  # the process was killed in the middle of this write
    second = metrics.MetricsWriter(str(tmp_path), total_steps=4, start_step=1)
    second.write(2, {"loss": 2.0}, progress=False)
    second.close()
    assert metrics.read_records(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]


def test_drop_torn_tail_leaves_complete_files_alone_and_empties_a_lone_torn_line(tmp_path):
    path = tmp_path / "f"
    for content, kept in [
        (b"", b""),
        (b"a\n", b"a\n"),
        (b"a\nb\n", b"a\nb\n"),
        (b"abc", b""),
        (b"a\n" + b"y" * 9000, b"a\n"),
    ]:
        path.write_bytes(content)
        metrics.drop_torn_tail(str(path))
        assert path.read_bytes() == kept
    metrics.drop_torn_tail(str(tmp_path / "missing"))  # nothing to do
