"""Reliability on the real path: the progress watchdog (a stall injected into one of two real
processes), the loss-spike guard (a poisoned batch) and host memory across many saves."""

import dataclasses
import gzip
import logging
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lmjax.checkpoint import checkpointer, compat
from lmjax.commands.experiment import load_experiment
from lmjax.config import DataConfig
from lmjax.data import run_stores, store
from lmjax.observe import metrics
from lmjax.train import run, watchdog
from tests.helpers import REPO, hamlet_tokenizer

# Process 1 blocks for good right after dispatching step 5, as in a storage read without a
# timeout: its threads, jax's heartbeat among them, go on.
STALL_SCRIPT = """
import logging, sys, threading, time
import jax
from lmjax.commands.experiment import load_experiment
from lmjax.checkpoint import checkpointer, compat
from lmjax.parallel import distributed
from lmjax.train import loop, run

def stall_forever():
    print(f"stalled at {time.time():.3f}", flush=True)
    threading.Event().wait()

class Stall(loop.Hook):
    def after_step(self, step, state, metrics):
        if step == 5 and jax.process_index() == 1:
            stall_forever()
        return False

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
distributed.initialize()
run.train(load_experiment("smoke", sys.argv[2:]), sys.argv[1], hooks=(Stall(),))
"""


def test_a_stalled_process_and_its_peer_dump_their_stacks_and_exit(tmp_path):
    """2 processes x 1 CPU device (gloo) through launch/local.py; process 1 stalls after step
    5 while its heartbeat goes on. Both watchdogs fire within the deadline (3 s floor), dump
    every thread's stack and exit 75; without the watchdog this run would never end."""
    script = tmp_path / "stall.py"
    script.write_text(STALL_SCRIPT)
    sets = [
        "data.source=synthetic",
        "run.steps=40",
        "run.log_every=1",
        "run.eval_batches=1",
        "checkpoint.every_steps=1000",
        "run.watchdog_min_seconds=3",
        "run.watchdog_startup_seconds=120",
    ]
    command = [
        sys.executable,
        str(REPO / "launch" / "local.py"),
        "--processes",
        "2",
        "--devices-per-process",
        "1",
        "--timeout",
        "300",
        "--",
        sys.executable,
        str(script),
        str(tmp_path / "run"),
        *sets,
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    ended = time.time()
    out = done.stdout + done.stderr
    assert done.returncode == watchdog.STALL_EXIT, out[-4000:]
    stalled = float(re.search(r"\[p1\] stalled at ([\d.]+)", out).group(1))
    for p in ("p0", "p1"):
        lines = [line for line in out.splitlines() if line.startswith(f"[{p}] ")]
        fired = [line for line in lines if "watchdog: no progress for" in line]
        assert len(fired) == 1, out[-4000:]
        assert any("most recent call first" in line for line in lines), out[-4000:]
    assert "waiting for step 6" in out  # process 0: process 1 never dispatched step 6
    assert any(line.startswith("[p1] ") and "in stall_forever" in line for line in out.splitlines())
    idle = [float(x) for x in re.findall(r"no progress for ([\d.]+) s", out)]
    print(
        f"\nwatchdog: fired after {idle} s without progress; both processes ended "
        f"{ended - stalled:.1f} s after the stall"
    )
    assert ended - stalled < 60


def test_a_run_hung_in_its_set_up_dumps_its_stacks_and_exits_naming_the_phase(tmp_path):
    """data.tokenizer names a FIFO that nobody writes: reading it blocks for good, as a read
    from a hung NFS server or a storage call without a timeout does. With the set-up
    deadline at 3 s (run.watchdog_startup_seconds, data.prepare_timeout_s) the run names the
    phase, dumps its stacks (the blocked read among them) and exits 75."""
    fifo = tmp_path / "tokenizer.model"
    os.mkfifo(fifo)
    command = [sys.executable, "-m", "lmjax", "train", "--experiment", "smoke"]
    command += ["--workdir", str(tmp_path / "run"), "--set", f"data.tokenizer={fifo}"]
    command += ["--set", "run.watchdog_startup_seconds=3", "--set", "data.prepare_timeout_s=3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.monotonic()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - start
    assert done.returncode == watchdog.STALL_EXIT, done.stderr[-4000:]
    assert "while waiting for the tokenizer and the data stores" in done.stderr, done.stderr[-4000:]
    assert "in load_tokenizer" in done.stderr and "most recent call first" in done.stderr
    idle = re.search(r"no progress for ([\d.]+) s", done.stderr).group(1)
    print(f"\nset-up hang: fired after {idle} s in the phase; the process ran {took:.1f} s")


def test_shards_prepared_inline_restart_the_deadline_and_a_stuck_shard_still_fires(
    tmp_path, caplog
):
    """A real inline preparation of 5 input files, FIFOs fed one every 0.4 s, under a 1 s
    deadline: the 4 fed shards take 1.6 s and each restarts the deadline, so the watchdog
    does not fire; the fifth, which nobody writes (its read blocks for good), fires it one
    deadline after the fourth finished. Fed then, the preparation commits."""
    deadline, pause, fed = 1.0, 0.4, 4
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    fifos = [inputs / f"part{i}.txt.gz" for i in range(fed + 1)]  # read without seeking
    for path in fifos:
        os.mkfifo(path)
    text = "\f\n".join(
        f"Document {j}: to be, or not to be, that is the question." for j in range(20)
    )
    fired = threading.Event()

    def feed(path):
        with open(path, "wb") as f:  # blocks until the preparation opens it
            f.write(gzip.compress(text.encode()))

    def writer():
        for path in fifos[:fed]:
            time.sleep(pause)
            feed(path)
        fired.wait(60)
        feed(fifos[-1])  # unblocks the preparation once the watchdog fired

    cfg = DataConfig(source="text", text_files=str(inputs), seq_len=16, batch_size=2)
    cfg = dataclasses.replace(cfg, validation_fraction=0.5)
    dog = watchdog.Watchdog(
        10.0, deadline, deadline, exit=lambda code: fired.set(), poll_seconds=0.02
    )
    caplog.set_level(logging.INFO, logger="lmjax")
    thread = threading.Thread(target=writer, daemon=True)
    start = time.time()
    thread.start()
    dog.expect("the data stores", deadline)
    try:
        directory = run_stores.ensure_store(
            cfg, hamlet_tokenizer(-1), str(tmp_path / "stores"), leader=True, progress=dog.progress
        )
    finally:
        dog.stop()
    thread.join(5)
    assert fired.is_set()
    (alarm,) = [r for r in caplog.records if r.getMessage().startswith("watchdog:")]
    assert "while waiting for the data stores" in alarm.getMessage()
    before = [r for r in caplog.records if "prepared shard" in r.getMessage()]
    before = [r for r in before if r.created < alarm.created]
    assert [r.getMessage().split()[2] for r in before] == [f"{i}/5" for i in range(1, fed + 1)]
    idle = float(re.search(r"no progress for ([\d.]+) s", alarm.getMessage()).group(1))
    assert deadline <= idle < deadline + 0.5  # printed to 0.1 s
    assert alarm.created - start > fed * pause > deadline  # alive past one deadline
    assert len(store.read_json(os.path.join(directory, store.META))["shards"]) == fed + 1
    print(
        f"\nfired {alarm.created - before[-1].created:.2f} s after the last finished shard, "
        f"{alarm.created - start:.2f} s into the preparation (deadline {deadline} s)"
    )


def test_an_offline_command_hung_in_its_restore_exits_naming_the_phase(tmp_path):
    """`lmjax eval` whose checkpoint's params/_METADATA is a FIFO that nobody writes (the
    restore's read blocks for good): with --watchdog-seconds 2 it names the restore, dumps its
    stacks (the blocked read among them) and exits 75."""
    step = tmp_path / "run" / "checkpoints" / "1"
    for item in ("params", "train", "data", "meta"):
        (step / item).mkdir(parents=True)
    os.mkfifo(step / "params" / "_METADATA")
    command = [sys.executable, "-m", "lmjax", "eval", "--workdir", str(tmp_path / "run")]
    command += ["--experiment-data", "--watchdog-seconds", "2"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == watchdog.STALL_EXIT, done.stderr[-4000:]
    assert "while waiting for the restore of the checkpoint" in done.stderr, done.stderr[-4000:]
    assert "in damage_evidence" in done.stderr and "most recent call first" in done.stderr
    idle = re.search(r"no progress for ([\d.]+) s", done.stderr).group(1)
    print(f"\noffline hang: fired after {idle} s in the restore")


POISONED = (5, 9)  # global batches with a NaN loss weight: a non-finite loss


def _poisoned(run_pipeline):
    """`run_stores.run_pipeline` whose training batches POISONED have a NaN loss weight."""

    def make(*args, **kwargs):
        pipe = run_pipeline(*args, **kwargs)
        clean = pipe.train_batch

        def train_batch(position):
            batch = clean(position)
            if position in POISONED:
                batch["loss_mask"][0, 0] = np.nan
            return batch

        pipe.train_batch = train_batch
        return pipe

    return make


def _losses(workdir) -> dict[int, float]:
    """{step: loss} of the last time each step was logged (replays overwrite)."""
    return {r["step"]: r["loss"] for r in metrics.read_records(workdir) if "loss" in r}


def test_poisoned_batches_are_rewound_skipped_and_recorded(tmp_path, monkeypatch):
    """Batches 5 and 9 poison steps 6 and 9 (batch 5 skipped, step 9 reads batch 9): each
    rewinds to the newest checkpoint (4, 8) and is skipped; the checkpoints record the skips,
    so a run restored from step 8 elsewhere reads the same batches and logs the same losses
    bit for bit."""
    monkeypatch.setattr(run_stores, "run_pipeline", _poisoned(run_stores.run_pipeline))
    config = load_experiment(
        "smoke",
        [
            "data.source=synthetic",
            "run.steps=12",
            "run.log_every=1",
            "run.eval_batches=1",
            "checkpoint.every_steps=4",
            "checkpoint.on_nonfinite=rewind",
            "checkpoint.spike_factor=1.5",  # on, and never fooled by the ordinary steps
            "checkpoint.max_rewinds=2",
        ],
    )
    run.train(config, str(tmp_path / "run"))
    records = metrics.read_records(tmp_path / "run")
    rewinds = [r for r in records if "rewind" in r]
    assert [(r["step"], r["rewind_from_step"], r["skipped_batch"]) for r in rewinds] == [
        (4, 6, 5),
        (8, 9, 9),
    ]
    assert all(np.isnan(r["rejected_loss"]) for r in rewinds)
    print("\nrewinds took", [round(r["rewind_seconds"], 2) for r in rewinds], "s")
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 13)) and np.isfinite(list(losses.values())).all()
    with checkpointer.ReadOnly(str(tmp_path / "run" / "checkpoints")) as ckpt:
        assert ckpt.read_json(12, "data")["skipped"] == [5, 9]
        assert ckpt.read_json(8, "data")["skipped"] == [5]
    run.train(config, str(tmp_path / "again"), restore_from=str(tmp_path / "run/checkpoints/8"))
    again = _losses(tmp_path / "again")
    assert again == {s: losses[s] for s in range(9, 13)}


def test_a_resume_with_an_accepted_batch_size_and_seq_len_change_reads_on(tmp_path):
    """The smoke run stopped at step 4, resumed with twice the batch and sequence length:
    refused unless checkpoint.accept_changes names both; then it trains on from step 4, from
    the windows read so far (tests/unit/test_data.py checks which, on a real store), and its
    checkpoints record it."""
    workdir = str(tmp_path / "run")
    base = [
        "data.source=synthetic",
        "run.log_every=1",
        "run.eval_batches=1",
        "checkpoint.every_steps=4",
    ]
    run.train(load_experiment("smoke", [*base, "run.steps=4"]), workdir)
    longer = [*base, "run.steps=6", "data.batch_size=16", "data.seq_len=128"]
    with pytest.raises(compat.ResumeError, match="data.batch_size: checkpoint 8, now 16"):
        run.train(load_experiment("smoke", longer), workdir)
    accept = "checkpoint.accept_changes=data.batch_size,data.seq_len"
    run.train(load_experiment("smoke", [*longer, accept]), workdir)
    assert sorted(_losses(workdir)) == list(range(1, 7))
    with checkpointer.ReadOnly(os.path.join(workdir, "checkpoints")) as ckpt:
        data = ckpt.read_json(6, "data")
    # steps 0-3 read 4 x 8 windows of 64 tokens: 16 windows of 128
    assert data["origin"] == {"position": 4, "window": 16}
    assert data["changes"] == [
        {"step": 4, "batch_size": [8, 16], "seq_len": [64, 128], "origin": data["origin"]}
    ]


SAVES = 50


MIB = 2**20


def test_host_memory_stays_flat_across_50_saves(tmp_path):
    """The smoke model saved after every step (async, keep 2): host RSS after save 50 is
    within 40 MiB of its value after save 10. Holding on to one copy of the 2 MiB state per
    save would add 80 MiB."""
    config = load_experiment(
        "smoke",
        [
            "data.source=synthetic",
            f"run.steps={SAVES}",
            "run.log_every=1",
            "run.eval_batches=1",
            "checkpoint.every_steps=1",
            "checkpoint.keep=2",
        ],
    )
    run.train(config, str(tmp_path))
    rss = {
        r["step"]: r["host_rss_gib"] * 2**30
        for r in metrics.read_records(tmp_path)
        if "host_rss_gib" in r
    }
    with checkpointer.ReadOnly(str(tmp_path / "checkpoints")) as ckpt:
        assert ckpt.steps() == [SAVES - 1, SAVES]
    # the metrics of step k are read after save k - 1 was started
    print(
        "\nhost RSS after save 1, 10, 25, 50: "
        + ", ".join(f"{rss[k + 1] / MIB:.0f}" for k in (1, 10, 25))
        + f", {rss[SAVES] / MIB:.0f} MiB"
    )
    assert rss[SAVES] - rss[11] < 40 * MIB
