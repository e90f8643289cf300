"""The workdir lease (lmjax/checkpoint/lease.py): its rules in-process on real lease records
(a local directory, the tests' GCS server), and a forked holder stopped inside its swap."""

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from lmjax.checkpoint import lease
from lmjax.errors import FaultError
from tests.helpers import lease_holder, process_stopped


def _remote_record(workdir: Path, timeout_s: float, renewed: float | None = None) -> None:
    """The lease as a run on another host writes it (a swap over whatever is there)."""
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
    store = lease.record_for(str(workdir))
    while not store.swap(store.read()[1], json.dumps(record)):
        pass


def test_a_live_holder_elsewhere_is_refused_once_it_renews(tmp_path):
    """A holder on another host that renews: the new run exits within one renewal interval,
    naming host, pid, start time and last renewal; the record is left as it was."""
    _remote_record(tmp_path, 1.2)
    stop = threading.Event()

    def renew():
        while not stop.wait(0.2):
            _remote_record(tmp_path, 1.2)

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
    assert lease_holder(tmp_path)["token"] == "remote"


def test_a_holder_that_stops_renewing_is_taken_over_after_its_timeout(tmp_path, caplog):
    _remote_record(tmp_path, 1.0)
    caplog.set_level(logging.WARNING, "lmjax")
    start = time.monotonic()
    taker = lease.Lease(lease.record_for(str(tmp_path)), 5.0, str(tmp_path))
    taker.acquire()
    waited = time.monotonic() - start
    try:
        assert waited > 0.9, waited  # not before the holder's 1 s timeout
        assert "taking over the lease" in caplog.text and "host another-host" in caplog.text
        mine = lease_holder(tmp_path)
        assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
        assert taker.healthy() is None
    finally:
        taker.release()
    assert lease_holder(tmp_path) is None  # released at the end


def test_racing_takers_of_a_stale_lease_one_wins(tmp_path):
    """Stale lease, four takers at once: one holds it, the others see it held (by a live
    process of this host) and are refused."""
    _remote_record(tmp_path, 1.0, renewed=time.time() - 10)
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
    _remote_record(tmp_path, 5.0)  # taken over while this holder hung
    held.release()
    assert lease_holder(tmp_path)["token"] == "remote"


def test_confirm_reads_the_record_again_and_sees_a_takeover_healthy_cannot(tmp_path):
    """A taker whose clock runs ahead takes the lease over while this holder's own clock says
    it renewed in time: `healthy` still says held, `confirm` reads the record and says lost
    (for good), and the commit guard refuses."""
    held = lease.Lease(lease.record_for(str(tmp_path)), 60.0, "w")
    held.acquire()
    try:
        assert held.confirm() is None and held.healthy() is None
        _remote_record(tmp_path, 60.0)
        assert held.healthy() is None  # renewed just now, by this process's clock
        assert held.confirm().startswith("taken over by host another-host, pid 4242")
        assert held.healthy() == held.confirm()
        with pytest.raises(
            FaultError,
            match=r"not committed: the lease of w is lost \(taken over by host another-host",
        ):
            lease.Guard(held, "w").confirm_commit()
        lease.Guard(None, "w").confirm_commit()  # not process 0: nothing to check
    finally:
        held.release()
    assert lease_holder(tmp_path)["token"] == "remote"


def test_local_swaps_from_one_version_have_one_winner(tmp_path):
    """Eight threads each add 1 to a counter 25 times by read-then-swap: no two swaps from one
    version both win, and every win is in the final count (a swap overtaken by two more
    before it looked may have counted without winning); the directory ends with two
    generations and no temporary file."""
    record = lease.record_for(str(tmp_path))
    wins = []

    def add():
        for _ in range(25):
            text, version = record.read()
            if record.swap(version, str(int(text or 0) + 1)):
                wins.append(version)

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    text, version = record.read()
    assert len(set(wins)) == len(wins) > 0
    assert len(wins) <= int(text) == version[0]  # each generation added 1 to the one before
    print(f"{len(wins)} wins, {int(text) - len(wins)} swaps that happened but returned False")
    assert len(os.listdir(record.path)) == 2, sorted(os.listdir(record.path))


def test_a_swap_from_an_old_version_loses_even_where_its_name_was_collected(tmp_path):
    """A swap whose process stopped between its read and its link: the next generation's
    name is taken (it loses at once), or was since collected and is free again (it links,
    sees that it is not the newest, and loses); the record stays the newest one either way.
    A temporary file left by a writer that died is collected by the next winner."""
    record = lease.record_for(str(tmp_path))
    assert record.read() == (None, (0, None)) and record.swap((0, None), "a")
    old = record.read()[1]
    assert record.swap(old, "b") and not record.swap(old, "late")
    for text in "cdef":
        assert record.swap(record.read()[1], text)
    assert not (Path(record.path) / f"{old[0] + 1:012d}.json").exists()  # collected
    dead = Path(record.path) / f".{record.read()[1][0]:012d}.{'0' * 32}.tmp"
    dead.write_text("a writer that died before its link")
    assert not record.swap(old, "late") and record.read()[0] == "f"
    assert record.swap(record.read()[1], None) and record.read()[0] == ""  # released
    assert sorted(p.name for p in Path(record.path).iterdir()) == [
        f"{g:012d}.json"
        for g in (6, 7)  # the late link at 2 and the dead tmp collected
    ]


def _stop_inside_the_next_renewal(go: int) -> None:
    """In a forked holder: SIGSTOP itself inside its first renewal's swap, just after its
    record is linked and before the swap has confirmed it; once continued, wait for `go`."""
    real = os.link

    def link_then_stop(src, dst):
        real(src, dst)
        if threading.current_thread().name == "lmjax-lease":
            os.link = real
            # to this thread: it stops before it runs on (os.kill lets it run a little)
            signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

    os.link = link_then_stop
    os.read(go, 1)


# The forked child runs only lease code and os calls, never jax; a lock it inherited held
# (the risk the fork warnings name) would fail the 30 s wait below, not hang the suite.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_holder_stopped_inside_its_swap_delays_no_taker(tmp_path):
    """A real (forked) holder stops (SIGSTOP) in the middle of a renewal, as a hung NFS
    client or a frozen VM would. While its record is fresh a taker is refused at once; once
    it is past the 1 s timeout a taker holds the lease in bounded time. Continued, the old
    holder knows that it lost the lease and its release leaves the taker's record alone."""
    record = lease.record_for(str(tmp_path))
    go_read, go_write = os.pipe()
    report_read, report_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: only lease code and os calls, then _exit
        try:
            held = lease.Lease(record, 1.0, "w")
            held.acquire()
            _stop_inside_the_next_renewal(go_read)
            time.sleep(0.2)  # the renewal thread finishes its swap
            os.write(report_write, str(held.healthy()).encode())
            held.release()
        finally:
            os._exit(0)
    try:
        deadline = time.monotonic() + 30
        while not process_stopped(pid):
            assert time.monotonic() < deadline, "the holder never reached its renewal"
            time.sleep(0.01)
        stopped = time.monotonic()
        holder = lease_holder(tmp_path)
        assert holder["pid"] == pid
        # inside the swap: linked, its temporary file not yet removed, not yet confirmed
        assert [n for n in os.listdir(record.path) if n.endswith(".tmp")]
        with pytest.raises(lease.WorkdirHeld, match=f"pid {pid}"):
            lease.Lease(record, 1.0, "w").acquire()  # fresh, and its process lives
        time.sleep(max(0.0, holder["renewed"] + 1.0 - time.time()))
        taker, outcome = lease.Lease(record, 5.0, "w"), []
        thread = threading.Thread(target=lambda: outcome.append(taker.acquire()), daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert outcome == [None], "the taker did not get the lease within 10 s"
        print(f"taken over {time.monotonic() - stopped:.2f} s after the holder stopped")
        os.kill(pid, signal.SIGCONT)
        os.write(go_write, b"x")
        with os.fdopen(report_read) as report:
            os.close(report_write)
            healthy = report.read()
        assert healthy.startswith(("not renewed for", "taken over by")), healthy
        assert os.waitpid(pid, 0)[1] == 0
        assert lease_holder(tmp_path)["token"] == taker._token
        taker.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


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
