"""Peak FLOP/s for MFU: the right chip variant, and the float32 peak for float32 compute;
the run's records and TensorBoard events read back as MetricsWriter wrote them, local and
on gs://."""

import os
import struct
import types

import pytest
from tensorboardX.proto import event_pb2

from lmjax import storage
from lmjax.config import Config, ConfigError
from lmjax.observe import goodput, metrics, report, throughput, wandb_log
from lmjax.workdir_names import LEGACY_METRICS, WANDB, WANDB_RUN_ID


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
        ("NVIDIA H200", "bfloat16", 989e12, "16-bit"),
        ("NVIDIA H200 NVL", "bfloat16", 835e12, "16-bit"),
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


def _records_of(writes):
    return [{"step": step, **values} for step, values in writes]


def test_read_records_gives_every_start_in_order_and_skips_a_torn_last_line(storage_root):
    first = metrics.MetricsWriter(storage_root, total_steps=3)
    first.write(1, {"loss": 2.5}, progress=False)
    first.write(2, {"loss": 2.25, "note": "x"}, progress=False)
    first.close(final=lambda: (2, {"event": "end"}))
    second = metrics.MetricsWriter(storage_root, total_steps=3, start_step=2)  # a restart
    second.write(3, {"loss": 2.0}, progress=False)
    second.close()
    written = _records_of([(1, {"loss": 2.5}), (2, {"loss": 2.25, "note": "x"})])
    written += _records_of([(2, {"event": "end"}), (3, {"loss": 2.0})])
    assert metrics.read_records(storage_root) == written
    assert storage.glob(storage.join(storage_root, "metrics", "*")) == [
        storage.join(storage_root, "metrics", name)
        for name in ("000000-000000.jsonl", "000001-000000.jsonl")
    ]
    # An object whose last line lacks its newline (written by another tool, or cut short).
    torn = storage.join(storage_root, "metrics", "000002-000000.jsonl")
    storage.path(torn).write_text('{"step": 4, "loss": 1.5}\n{"step": 5, "lo')
    written += [{"step": 4, "loss": 1.5}]
    assert metrics.read_records(storage_root) == written
    assert report.load(storage_root) == written
    assert goodput.last_reached_step(storage_root) == 4


def test_records_of_a_run_begun_with_metrics_jsonl_come_first(tmp_path):
    (tmp_path / LEGACY_METRICS).write_text('{"step": 1, "loss": 3.0}\n{"step": 2')
    writer = metrics.MetricsWriter(str(tmp_path), total_steps=3)
    writer.write(2, {"loss": 2.0}, progress=False)
    writer.close()
    assert metrics.read_records(tmp_path) == _records_of([(1, {"loss": 3.0}), (2, {"loss": 2.0})])


def test_a_long_start_is_cut_into_chunks_each_written_whole(storage_root, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_RECORDS", 3)
    writer = metrics.MetricsWriter(storage_root, total_steps=7, flush_s=0.0)
    for step in range(1, 8):
        writer.write(step, {"loss": 1.0 / step}, progress=False)
    objects = storage.glob(storage.join(storage_root, "metrics", "*"))
    assert [o.rsplit("/", 1)[1] for o in objects] == [
        "000000-000000.jsonl",
        "000000-000001.jsonl",
        "000000-000002.jsonl",
    ]
    assert [len(storage.path(o).read_text().splitlines()) for o in objects] == [3, 3, 1]
    writer.close()
    assert metrics.read_records(storage_root) == _records_of(
        [(step, {"loss": 1.0 / step}) for step in range(1, 8)]
    )


def test_records_wait_at_most_flush_s_before_they_are_written(storage_root):
    writer = metrics.MetricsWriter(storage_root, total_steps=3, flush_s=3600.0)
    writer.write(1, {"loss": 2.0}, progress=False)  # the first record is written at once
    writer.write(2, {"loss": 1.0}, progress=False)  # within flush_s of it: held
    assert metrics.read_records(storage_root) == _records_of([(1, {"loss": 2.0})])
    writer.close()
    assert metrics.read_records(storage_root) == _records_of(
        [(1, {"loss": 2.0}), (2, {"loss": 1.0})]
    )


def _scalars(event_file_bytes: bytes) -> list[tuple[int, str, float]]:
    """(step, tag, value) of each scalar in a TensorBoard event file (TFRecord framing: u64
    length, u32 crc, data, u32 crc)."""
    out, pos = [], 0
    while pos < len(event_file_bytes):
        (length,) = struct.unpack("<Q", event_file_bytes[pos : pos + 8])
        event = event_pb2.Event.FromString(event_file_bytes[pos + 12 : pos + 12 + length])
        out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
        pos += 12 + length + 4
    return out


def test_tensorboard_events_reach_the_workdir_each_byte_uploaded_once(storage_root):
    writer = metrics.MetricsWriter(storage_root, total_steps=3, flush_s=0.0)
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)}, progress=False)
    writer.close()
    files = storage.glob(storage.join(storage_root, "tensorboard", "*"))
    scalars = [s for f in files for s in _scalars(storage.path(f).read_bytes())]
    assert sorted(scalars) == [(1, "loss", 1.0), (2, "loss", 2.0), (3, "loss", 3.0)]
    if storage.is_url(storage_root):  # a new event file after each flush, none rewritten
        assert len(files) >= 3
    else:
        assert len(files) == 1


def test_a_missing_metrics_file_is_an_error_unless_allowed(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics"):
        metrics.read_records(tmp_path)
    assert metrics.read_records(tmp_path, missing_ok=True) == []
    assert goodput.last_reached_step(str(tmp_path)) == 0
    with pytest.raises(ConfigError, match="metrics does not exist: give the --workdir"):
        report.load(str(tmp_path))


def test_wandb_offline_files_land_in_the_workdir(storage_root, monkeypatch):
    """An offline W&B run of a gs:// workdir is copied into WORKDIR/wandb/ when it closes
    (wandb writes local files only, and a recreated VM's disk is gone), and a restart logs
    into the same run id; a local workdir holds wandb's own folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    storage.path(storage_root).mkdir(parents=True, exist_ok=True)  # as a run's start does
    ids = []
    for start in range(2):
        writer = wandb_log.WandbWriter("lmjax-test", storage_root, Config())
        writer.write(start, {"step": start, "loss": 1.5 - start, "note": "text"})
        writer.close()
        ids.append(storage.path(storage.join(storage_root, WANDB_RUN_ID)).read_text().strip())
    assert ids[0] == ids[1]
    logs = storage.glob(storage.join(storage_root, WANDB, f"offline-run-*-{ids[0]}", "*.wandb"))
    assert logs, "no offline run in the workdir"
    # The runs' records (NAME.wandb), byte for byte; wandb's debug logs may still grow after
    # the run finished (its service process writes them), so they are not compared.
    local = os.path.join(writer.files_dir, WANDB)
    for root, _, files in os.walk(local):
        for name in (n for n in files if n.endswith(".wandb")):
            rel = os.path.relpath(os.path.join(root, name), local).split(os.sep)
            copy = storage.path(storage.join(storage_root, WANDB, *rel))
            assert copy.read_bytes() == open(os.path.join(root, name), "rb").read(), rel
