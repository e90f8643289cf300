"""One run per workdir: the lease WORKDIR/lease (a directory of generations on a local disk,
one object on gs://).

Process 0 takes the lease before any checkpoint is read (`held`), a background thread renews
it every `timeout_s / RENEWALS` seconds, and it is released (an empty record) when the run
ends. Rules for a run
that finds a lease there:
- no lease: take it;
- last renewed more than the holder's `timeout_s` ago (by this host's clock, so hosts' clocks
  must agree to within timeout_s * (1 - 1/RENEWALS), as NTP keeps them): stale, taken over
  with a warning;
- held by a process of this host and pid namespace: taken over at once if that process is
  gone (a SIGKILL), refused at once if it lives;
- held from elsewhere: watched until it is renewed (its holder lives: refused, within one
  renewal interval) or goes stale (taken over). A supervisor's restart after a lost host
  therefore waits at most `timeout_s`, and a second run beside a live one exits.
Every change of the lease is a compare-and-swap that waits for no one (`LocalRecord.swap`
links the next generation's name, `GcsRecord.swap` is one write with a generation-match
precondition), so two runs that race for one lease cannot both win, and a holder stopped in
the middle of a change (SIGSTOP, a hung NFS client) delays no other run. A holder whose
renewal found another run's lease, or that could not renew for `timeout_s` (counted from the
time its last record was made, so a renewal that a stop delayed does not count as fresh), has
lost it: the `Guard` then stops the run before its next save, and `Guard.confirm_commit`,
which orbax calls right before it commits an async save, reads the record again and leaves
a save in flight uncommitted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Iterator

import gcsfs
import jax
import numpy as np
from jax.experimental import multihost_utils

from lmjax.config import ConfigError
from lmjax.errors import FaultError
from lmjax.workdir_names import LEASE

log = logging.getLogger("lmjax")

RENEWALS = 6  # renewals per timeout: a live holder renews every timeout_s / RENEWALS
_READ_TRIES = 100


class WorkdirHeld(ConfigError):
    """Another live run holds the workdir's lease; the message names it."""


class LocalRecord:
    """The lease on a local (or NFS) disk: the directory PATH/ of generation files
    GGGGGGGGGGGG.json, the newest being the record. Nothing is ever locked, so a process
    stopped in the middle of a swap (SIGSTOP, a hung NFS client, a frozen VM) blocks nobody:
    - a swap from generation g writes its record to a temporary file, then links it to the
      name of g + 1; link(2) fails when that name exists (atomic on local disks and NFS), so
      of two swaps from g exactly one wins, and a late one (its holder was stopped) loses;
    - a file appears whole (linked once written); its first line names its nonce and its
      predecessor's;
    - the winner deletes the generations before its predecessor and the temporary files of
      swaps that lost or died. A name deleted that way could be linked again by a swap that
      read its predecessor long ago; such a swap is not the newest generation when it looks
      right after its link, nor the one the next generation names, and so returns False.
      (A swap that was followed by two more, and collected, before it could look returns
      False too although it happened: either way its caller finds a newer record than its
      own, which is all the lease needs to know);
    - the newest generation is never deleted (a release writes an empty record), so the
      generations only grow and a reader never sees an older record than one it saw.
    """

    def __init__(self, path: str):
        self.path = path

    def _name(self, generation: int) -> str:
        return os.path.join(self.path, f"{generation:012d}.json")

    def _listing(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []

    def _generations(self) -> list[int]:
        names = self._listing()
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def _load(self, generation: int) -> tuple[dict, str] | None:
        """(header, record text) of one generation; None once it is deleted."""
        try:
            with open(self._name(generation)) as f:
                head, _, text = f.read().partition("\n")
        except FileNotFoundError:
            return None
        try:
            header = json.loads(head)
        except ValueError:
            header = None
        return (header if isinstance(header, dict) else {}), text

    def read(self) -> tuple[str | None, tuple[int, str | None]]:
        """(record text, None when there is none, and its version for `swap`)."""
        for _ in range(_READ_TRIES):  # the newest is deleted only once two newer exist
            generations = self._generations()
            if not generations:
                return None, (0, None)
            loaded = self._load(generations[-1])
            if loaded is not None:
                return loaded[1], (generations[-1], loaded[0].get("nonce"))
        raise OSError(f"{self.path}: its newest generation was replaced {_READ_TRIES} times")

    def swap(self, version: tuple[int, str | None], text: str | None) -> bool:
        """Writes `text` (None: an empty record, no lease) as the generation after `version`
        if that is still the newest; returns whether it did (False also where it can no
        longer tell: see the class)."""
        generation, previous = version
        nonce = uuid.uuid4().hex
        os.makedirs(self.path, exist_ok=True)
        tmp = os.path.join(self.path, f".{generation + 1:012d}.{nonce}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps({"nonce": nonce, "previous": previous}) + "\n" + (text or ""))
        try:
            os.link(tmp, self._name(generation + 1))
        except (FileExistsError, FileNotFoundError):  # taken; or tmp collected by a winner
            return False
        except OSError as e:  # EPERM, ENOTSUP: e.g. a gcsfuse mount
            raise ConfigError(
                f"{self.path}: this filesystem cannot hard-link files ({e}), which the lease "
                "needs. Fix: put the workdir on a local disk or NFS, or pass gs://... itself "
                "rather than a FUSE mount of it."
            ) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        if not self._confirmed(generation + 1, nonce):
            return False
        self._collect(generation)
        return True

    def _confirmed(self, generation: int, nonce: str) -> bool:
        """Whether the file just linked as `generation` is in the chain of records (not a
        deleted name linked again): the newest, or the predecessor of the next one."""
        if self._generations()[-1:] == [generation]:
            return True
        following = self._load(generation + 1)
        return following is not None and following[0].get("previous") == nonce

    def _collect(self, keep_from: int) -> None:
        """Deletes the generations before `keep_from` (the winner's predecessor) and the
        temporary files of swaps to generations up to the winner's: those swaps have lost, or
        their writer died."""
        for name in self._listing():
            tmp = name.startswith(".")
            stem = name[1:].split(".")[0] if tmp else name.removesuffix(".json")
            if stem.isdigit() and int(stem) <= (keep_from + 1 if tmp else keep_from - 1):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.path, name))


class GcsRecord:
    """The lease object on Cloud Storage (gs://BUCKET/KEY). Its version is the object's
    generation (0: absent), and each swap is one multipart upload with an ifGenerationMatch
    precondition, so the server decides a race. Releasing writes an empty object (which reads
    as no lease) rather than deleting, so that it is a precondition write as well."""

    def __init__(self, url: str):
        self.path = url
        self._fs = gcsfs.core.GCSFileSystem(skip_instance_cache=True)
        self._bucket, self._key, _ = self._fs.split_path(url)

    def read(self) -> tuple[str | None, int]:
        try:
            headers, body = self._fs.call("GET", self._fs.url(self.path))
        except FileNotFoundError:
            return None, 0
        return body.decode(), int(headers["x-goog-generation"])

    def swap(self, version: int, text: str | None) -> bool:
        meta = json.dumps({"name": self._key})
        body = (
            f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
            f"Content-Type: application/json\n\n{text or ''}\n--==0==--"
        )
        try:
            self._fs.call(
                "POST",
                f"{self._fs._location}/upload/storage/v1/b/{{}}/o",
                self._bucket,
                uploadType="multipart",
                headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                data=body.encode(),
                ifGenerationMatch=str(version),
            )
        except FileExistsError:  # 412: the precondition failed
            return False
        return True


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (None: no such process), so
    that a reused pid is not taken for the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _here() -> dict:
    return {"host": socket.gethostname(), "pidns": _pid_namespace()}


def describe(holder: dict, now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return (
        f"host {holder.get('host')}, pid {holder.get('pid')}, started {started}, last renewed "
        f"{now - holder.get('renewed', 0):.0f} s ago"
    )


def _parse(text: str | None) -> dict | None:
    """The holder a lease record names; None for no record or a released one (empty)."""
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {"renewed": 0.0, "timeout_s": 0.0}  # unreadable: stale
    return holder if isinstance(holder, dict) else {"renewed": 0.0, "timeout_s": 0.0}


def _local_fate(holder: dict) -> str | None:
    """'alive' or 'gone' for a holder in this host's pid namespace; None for one elsewhere."""
    if {k: holder.get(k) for k in ("host", "pidns")} != _here():
        return None
    started = _process_start(int(holder.get("pid", -1)))
    return "alive" if started is not None and started == holder.get("proc_start") else "gone"


def _verdict(holder: dict, now: float, first_seen: float | None) -> str:
    """'held', 'wait', or why the lease may be taken over (module docstring)."""
    age = now - float(holder.get("renewed", 0.0))
    if age > float(holder.get("timeout_s", 0.0)):
        return f"not renewed for {age:.0f} s, past its {holder.get('timeout_s', 0.0):g} s timeout"
    fate = _local_fate(holder)
    if fate == "gone":
        return "its process is gone"
    if fate == "alive" or (first_seen is not None and holder.get("renewed") != first_seen):
        return "held"
    return "wait"


class Lease:
    """This process's lease on `record` (a `LocalRecord`, a `GcsRecord`, or any record with
    their read and swap), renewed by a background thread between `acquire` and `release`."""

    def __init__(self, record, timeout_s: float, where: str):
        self.record, self.timeout_s, self.where = record, timeout_s, where
        self._token, self._started = uuid.uuid4().hex, time.time()
        self._text: str | None = None  # the record as this process last wrote it
        # time.monotonic() when the newest record this process wrote was made: a swap that a
        # stop delayed counts from before the stop, as the record's `renewed` does for others
        self._renewed = 0.0
        self._lost: str | None = None
        self._lock = threading.Lock()  # a renewal's read and swap against `confirm`'s read
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="lmjax-lease", daemon=True)

    def _record(self) -> str:
        return json.dumps(
            {
                **_here(),
                "pid": os.getpid(),
                "proc_start": _process_start(os.getpid()),
                "token": self._token,
                "started": self._started,
                "renewed": time.time(),
                "timeout_s": self.timeout_s,
            }
        )

    def acquire(self) -> None:
        """Takes the lease, waiting on a holder elsewhere until it renews or goes stale;
        raises WorkdirHeld when its holder lives."""
        first_seen = None  # the watched holder's last renewal when first read
        while True:
            text, version = self.record.read()
            holder, now = _parse(text), time.time()
            if holder is not None:
                verdict = _verdict(holder, now, first_seen)
                if verdict == "held":
                    raise WorkdirHeld(self._held_message(holder, now))
                if verdict == "wait":
                    if first_seen is None:
                        first_seen = holder.get("renewed")
                        log.info(
                            "%s is leased from another host (%s): waiting for it to be "
                            "renewed (a live run: this one exits) or to expire",
                            self.where,
                            describe(holder, now),
                        )
                    time.sleep(self.timeout_s / RENEWALS / 4)
                    continue
                log.warning(
                    "taking over the lease of %s from %s: %s",
                    self.where,
                    describe(holder, now),
                    verdict,
                )
            new, made = self._record(), time.monotonic()
            if self.record.swap(version, new):
                self._text, self._renewed = new, made
                self._thread.start()
                return

    def _held_message(self, holder: dict, now: float) -> str:
        return (
            f"{self.where} is in use by another run ({describe(holder, now)}; its lease is "
            f"{self.record.path}). Nothing was read or changed. Fix: stop that run first or "
            "give this one another workdir; a lease not renewed for "
            f"{holder.get('timeout_s', 0.0):g} s is taken over."
        )

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timeout_s / RENEWALS) and self._lost is None:
            try:
                self._renew()
            except Exception as e:  # a storage hiccup: retried; `healthy` times out
                log.warning("renewing the lease of %s failed (%s); retrying", self.where, e)

    def _renew(self) -> None:
        with self._lock:
            text, version = self.record.read()
            if not self._is_mine(text):
                return
            new, made = self._record(), time.monotonic()
            if self.record.swap(version, new):
                self._text, self._renewed = new, made

    def _is_mine(self, text: str | None) -> bool:
        """Whether `text`, the record as just read, is the one this process last wrote; if not,
        the lease is lost for good (logged)."""
        if text == self._text:
            return True
        holder = _parse(text)
        self._lost = (
            "its lease was deleted"
            if holder is None
            else f"taken over by {describe(holder, time.time())}"
        )
        log.error("LOST the lease of %s: %s", self.where, self._lost)
        return False

    def healthy(self) -> str | None:
        """None while the lease is held; otherwise why it may no longer be."""
        silent = time.monotonic() - self._renewed
        if self._lost is None and silent > self.timeout_s:
            return f"not renewed for {silent:.0f} s, so another run may have taken it over"
        return self._lost

    def confirm(self) -> str | None:
        """`healthy`, then the record read again: None while it is still the one this process
        last wrote (a taker whose clock runs ahead may take over before `healthy` says so)."""
        if self.healthy() is None:
            with self._lock:
                self._is_mine(self.record.read()[0])
        return self.healthy()

    def release(self) -> None:
        """Stops renewing and deletes the lease if it is still this process's."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._lost is not None or self._text is None:
            return
        try:
            text, version = self.record.read()
            if text == self._text:
                self.record.swap(version, None)
        except OSError as e:
            log.warning(
                "could not delete the lease of %s (%s): it expires by itself", self.where, e
            )


def record_for(workdir: str) -> LocalRecord | GcsRecord:
    if workdir.startswith("gs://"):
        return GcsRecord(f"{workdir.rstrip('/')}/{LEASE}")
    if "://" in workdir:
        raise ConfigError(f"--workdir {workdir}: only local paths and gs:// are supported.")
    return LocalRecord(os.path.join(os.path.abspath(workdir), LEASE))


def _agree(code: int) -> int:
    """Process 0's `code`, on every process (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return code
    return int(multihost_utils.broadcast_one_to_all(np.int32(code)))


class Guard:
    """What `held` yields. Called by every process before a save (a collective): raises
    FaultError on all of them once process 0's lease may be lost. `lost()`: why, on process 0
    alone and without a collective (None elsewhere and while held), so that an error raised
    on one process (a save that failed) can name the cause."""

    def __init__(self, lease: Lease | None, workdir: str):
        self._lease, self._workdir = lease, workdir

    def lost(self) -> str | None:
        return self._lease.healthy() if self._lease is not None else None

    def confirm_commit(self) -> None:
        """Raises FaultError once process 0's lease is lost (`Lease.confirm`: the record read
        again); a no-op on the other processes. No collective: orbax calls it on process 0
        alone, in the background, after an async save's files are written and before their
        commit, which the error prevents."""
        reason = self._lease.confirm() if self._lease is not None else None
        if reason is not None:
            raise FaultError(f"not committed: the lease of {self._workdir} is lost ({reason})")

    def __call__(self) -> None:
        reason = self.lost()
        if _agree(reason is not None):
            raise FaultError(
                f"the lease of {self._workdir} is lost ({reason or 'see the log of process 0'})"
                ": stopping before the next save so that two runs never write one workdir. "
                "Rerun the same command to resume once the other run has ended."
            )


@contextlib.contextmanager
def held(workdir: str, timeout_s: float) -> Iterator[Guard]:
    """Holds `workdir`'s lease on process 0 while the block runs, and yields its `Guard`.
    Raises WorkdirHeld (on every process) when another run holds it."""
    lease = Lease(record_for(workdir), timeout_s, workdir) if jax.process_index() == 0 else None
    error: Exception | None = None
    if lease is not None:
        try:
            lease.acquire()
        except Exception as e:  # every process must learn the outcome before raising
            error = e
    outcome = _agree(0 if error is None else 1 if isinstance(error, WorkdirHeld) else 2)
    if error is not None:
        raise error
    if outcome:
        cls = WorkdirHeld if outcome == 1 else FaultError
        raise cls(f"process 0 could not lease {workdir}: see its log.")
    try:
        yield Guard(lease, workdir)
    finally:
        if lease is not None:
            lease.release()
