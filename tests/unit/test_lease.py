"""The workdir lease (lmjax/checkpoint/lease.py): in-process rules on a real lease file, then
real `lmjax train` processes: a second run beside a live one, and a hung holder taken over."""

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from lmjax.checkpoint import lease


def _remote_record(path: Path, timeout_s: float, renewed: float | None = None) -> None:
    """The lease as a run on another host writes it."""
    record = {
        "host": "another-host",
        "pidns": "pid:[1]",
        "pid": 4242,
        "proc_start": "1",
        "token": "remote",
        "started": time.time() - 100,
        "renewed": time.time() if renewed is None else renewed,
        "timeout_s": timeout_s,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def test_a_live_holder_elsewhere_is_refused_once_it_renews(tmp_path):
    """A holder on another host that renews: the new run exits within one renewal interval,
    naming host, pid, start time and last renewal; the record is left as it was."""
    path = tmp_path / lease.LEASE
    _remote_record(path, 1.2)
    stop = threading.Event()

    def renew():
        while not stop.wait(0.2):
            _remote_record(path, 1.2)

    holder = threading.Thread(target=renew)
    holder.start()
    try:
        start = time.monotonic()
        with pytest.raises(lease.WorkdirHeld) as refused:
            lease.Lease(lease.record_for(str(tmp_path)), 1.2, str(tmp_path)).acquire()
        waited = time.monotonic() - start
    finally:
        stop.set()
        holder.join()
    message = str(refused.value)
    assert "host another-host, pid 4242, started " in message and "last renewed 0 s ago" in message
    assert "\n" not in message, message  # refused, so before the 1.2 s timeout expired
    print(f"refused after {waited:.2f} s")
    assert json.loads(path.read_text())["token"] == "remote"


def test_a_holder_that_stops_renewing_is_taken_over_after_its_timeout(tmp_path, caplog):
    path = tmp_path / lease.LEASE
    _remote_record(path, 1.0)
    caplog.set_level(logging.WARNING, "lmjax")
    start = time.monotonic()
    taker = lease.Lease(lease.record_for(str(tmp_path)), 5.0, str(tmp_path))
    taker.acquire()
    waited = time.monotonic() - start
    try:
        assert waited > 0.9, waited  # not before the holder's 1 s timeout
        assert "taking over the lease" in caplog.text and "host another-host" in caplog.text
        mine = json.loads(path.read_text())
        assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
        assert taker.healthy() is None
    finally:
        taker.release()
    assert not path.exists()  # released at the end


def test_racing_takers_of_a_stale_lease_one_wins(tmp_path):
    """Stale lease, four takers at once: one holds it, the others see it held (by a live
    process of this host) and are refused."""
    _remote_record(tmp_path / lease.LEASE, 1.0, renewed=time.time() - 10)
    outcomes, takers = (
        [],
        [lease.Lease(lease.record_for(str(tmp_path)), 5.0, "w") for _ in range(4)],
    )

    def take(t):
        try:
            t.acquire()
            outcomes.append("won")
        except lease.WorkdirHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in takers:
        t.release()
    assert sorted(outcomes) == ["refused"] * 3 + ["won"], outcomes


def test_release_leaves_a_lease_that_another_run_took(tmp_path):
    held = lease.Lease(lease.record_for(str(tmp_path)), 5.0, "w")
    held.acquire()
    _remote_record(tmp_path / lease.LEASE, 5.0)  # taken over while this holder hung
    held.release()
    assert json.loads((tmp_path / lease.LEASE).read_text())["token"] == "remote"


def test_on_gcs_each_change_is_one_generation_precondition(gcs_bucket):
    """The same rules on gs:// (the tests' GCS server): racing takers of a stale lease, one
    wins and the others are refused (its holder lives); release changes only the holder's own
    generation."""
    workdir = f"{gcs_bucket}/run"
    record = lease.record_for(workdir)
    assert record.read() == (None, 0)
    stale = json.dumps({"host": "another-host", "renewed": time.time() - 10, "timeout_s": 1.0})
    assert record.swap(0, stale) and not record.swap(0, stale)  # create: only if absent
    outcomes, takers = [], [lease.Lease(lease.record_for(workdir), 5.0, workdir) for _ in range(3)]

    def take(t):
        try:
            t.acquire()
            outcomes.append(t)
        except lease.WorkdirHeld:
            pass

    threads = [threading.Thread(target=take, args=(t,)) for t in takers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 1, outcomes
    winner = outcomes[0]
    text, generation = record.read()
    assert json.loads(text)["pid"] == os.getpid()
    assert not record.swap(generation - 1, None)  # a stale generation changes nothing
    for t in takers:
        if t is not winner:
            t.release()
    assert record.read()[1] == generation
    winner.release()
    assert record.read()[0] == ""  # released: reads as no lease
    again = lease.Lease(lease.record_for(workdir), 5.0, workdir)
    again.acquire()
    again.release()
