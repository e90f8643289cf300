"""Preparation into the TensorStore (zarr3) store and the random-access pipeline, checked against naive
references (sentencepiece on the raw documents, a Python loop over tokens)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lmjax import cli
from lmjax.config import ConfigError
from lmjax.data import beam_engine, prepare, sources, store
from lmjax.data.pipeline import make_pipeline
from tests.helpers import store_objects, untimed_objects
from tests.unit import test_data as fast_tier
from tests.unit.test_data import (
    _corpus_files,
    _run_files,
    assert_batches_equal,
    same_store,
    take,
    text_cfg,
)

# The fast tier's module-scoped fixtures these tests share (pytest finds a fixture by the
# module attribute that holds it).
corpus = fast_tier.corpus
prepared = fast_tier.prepared
tok = fast_tier.tok


def test_beam_direct_runner_with_2_worker_processes_equals_inline_byte_for_byte(tok, tmp_path):
    cfg = _corpus_files(tmp_path / "corpus", 6)
    inline_dir, _ = prepare.prepare(cfg, tok, str(tmp_path / "inline"))
    root = str(tmp_path / "beam")
    options = beam_engine.pipeline_options("DirectRunner", 2, "", root)
    directory, meta = prepare.prepare(cfg, tok, root, beam_options=options)
    assert meta["summary"]["shards"] == 6
    same_store(directory, inline_dir)


def test_killed_beam_prepare_leaves_no_store_and_a_rerun_finishes_it(tok, tmp_path):
    """`lmjax data prepare --workers 2` (Beam DirectRunner worker processes) killed after its
    first shards: nothing readable as a store; a rerun completes it, equal to an uninterrupted
    preparation."""
    cfg = _corpus_files(tmp_path / "corpus", 12)
    workdir, experiment = _run_files(tmp_path, cfg, tok)
    command = [
        sys.executable,
        "-m",
        "lmjax",
        "data",
        "prepare",
        "--experiment",
        str(experiment),
        "--workdir",
        str(workdir),
        "--workers",
        "2",
    ]
    proc = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    directory = sources.locate(cfg, tok, str(workdir / "data"))[0]
    deadline = time.monotonic() + 180
    while not (
        os.path.isdir(directory) and any(f.startswith("shard-") for f in os.listdir(directory))
    ):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before the kill"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(directory, store.META))
    with pytest.raises(ConfigError, match="no prepared store.*lmjax data prepare"):
        make_pipeline(cfg, tok, stores={"text": directory})
    done_by_workers = [f for f in os.listdir(directory) if f.startswith("shard-")]
    assert 0 < len(done_by_workers) < 12
    assert (
        cli.main(["data", "prepare", "--experiment", str(experiment), "--workdir", str(workdir)])
        == 0
    )  # the rerun: Beam in this process
    fresh_dir, _ = prepare.prepare(cfg, tok, str(tmp_path / "fresh"))
    same_store(directory, fresh_dir)


def test_prepare_to_gcs_inline_and_by_beam_equals_local_and_reads_the_same_batches(
    corpus, tok, prepared, gcs_bucket, tmp_path, capsys
):
    """A store written on a GCS server (only STORAGE_EMULATOR_HOST set), inline and by
    `lmjax data prepare` (Beam DirectRunner), holds the local store's bytes, and a pipeline
    reading it gives the local batches at steps 0 and 10**7."""
    local = untimed_objects(store_objects(prepared[0]))
    inline, _ = prepare.prepare(text_cfg(corpus), tok, f"{gcs_bucket}/inline")
    assert inline == f"{gcs_bucket}/inline/{os.path.basename(prepared[0])}"
    assert untimed_objects(store_objects(inline)) == local
    workdir, experiment = _run_files(tmp_path, text_cfg(corpus), tok)
    base = ["data", "prepare", "--experiment", str(experiment), "--workdir", str(workdir)]
    assert cli.main([*base, "--set", f"data.store_dir={gcs_bucket}/beam"]) == 0
    beam = f"{gcs_bucket}/beam/{os.path.basename(prepared[0])}"
    assert f"store: {beam}" in capsys.readouterr().out
    assert untimed_objects(store_objects(beam)) == local
    for step in (0, 10**7):
        assert_batches_equal(
            take(make_pipeline(text_cfg(corpus), tok, stores={"text": beam}), step, 2),
            take(make_pipeline(text_cfg(corpus), tok, stores={"text": prepared[0]}), step, 2),
        )
    assert cli.main(["data", "verify", beam]) == 0
    assert not any("gs:" in f for _, dirs, files in os.walk(tmp_path) for f in dirs + files)
