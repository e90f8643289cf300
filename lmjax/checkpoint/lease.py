"""One run per workdir: the lease WORKDIR/lease.json.

Process 0 takes the lease before any checkpoint is read (`held`), a background thread renews
it every `timeout_s / RENEWALS` seconds, and it is deleted when the run ends. Rules for a run
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
Every change of the lease is a compare-and-swap (`LocalRecord.swap` under an flock,
`GcsRecord.swap` with a generation-match precondition), so two runs that race for one lease
cannot both win. A holder whose renewal found another run's lease, or that
could not renew for `timeout_s`, has lost it: `check` then stops the run before its next save.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Iterator

import gcsfs
import jax
import numpy as np
from jax.experimental import multihost_utils

from lmjax.config import ConfigError
from lmjax.errors import FaultError
from lmjax.workdir_names import LEASE

log = logging.getLogger("lmjax")

RENEWALS = 6  # renewals per timeout: a live holder renews every timeout_s / RENEWALS


class WorkdirHeld(ConfigError):
    """Another live run holds the workdir's lease; the message names it."""


class LocalRecord:
    """The lease file on a local (or NFS) disk. Each swap holds an exclusive flock on
    PATH.lock while it compares and writes, and writes by rename, so a reader never sees a
    partial record and two swaps never interleave."""

    def __init__(self, path: str):
        self.path = path

    def read(self) -> tuple[str | None, str | None]:
        """(record text or None, version): the version to pass to `swap`."""
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None, None
        return text, text

    def swap(self, version: str | None, text: str | None) -> bool:
        """Replaces the record by `text` (None: deletes it) if it is still at `version`
        (None: absent); returns whether it did."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.read()[1] != version:
                return False
            if text is None:
                os.remove(self.path)
            else:
                tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, self.path)
            return True


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
    """This process's lease on `record` (a `LocalRecord`, or another store with its read and
    swap), renewed by a background thread between `acquire` and `release`."""

    def __init__(self, record, timeout_s: float, where: str):
        self.record, self.timeout_s, self.where = record, timeout_s, where
        self._token, self._started = uuid.uuid4().hex, time.time()
        self._text: str | None = None  # the record as this process last wrote it
        self._renewed = 0.0  # time.monotonic() of the last renewal
        self._lost: str | None = None
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
            new = self._record()
            if self.record.swap(version, new):
                self._text, self._renewed = new, time.monotonic()
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
        text, version = self.record.read()
        if text != self._text:
            holder = _parse(text)
            self._lost = (
                "its lease was deleted"
                if holder is None
                else f"taken over by {describe(holder, time.time())}"
            )
            log.error("LOST the lease of %s: %s", self.where, self._lost)
            return
        new = self._record()
        if self.record.swap(version, new):
            self._text, self._renewed = new, time.monotonic()

    def healthy(self) -> str | None:
        """None while the lease is held; otherwise why it may no longer be."""
        silent = time.monotonic() - self._renewed
        if self._lost is None and silent > self.timeout_s:
            return f"not renewed for {silent:.0f} s, so another run may have taken it over"
        return self._lost

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


@contextlib.contextmanager
def held(workdir: str, timeout_s: float) -> Iterator[Callable[[], None]]:
    """Holds `workdir`'s lease on process 0 while the block runs, and yields `check`, which
    every process calls before a save: it raises FaultError on all of them once process 0's
    lease may be lost. Raises WorkdirHeld (on every process) when another run holds it."""
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

    def check() -> None:
        reason = lease.healthy() if lease is not None else None
        if _agree(reason is not None):
            raise FaultError(
                f"the lease of {workdir} is lost ({reason or 'see the log of process 0'}): "
                "stopping before the next save so that two runs never write one workdir. "
                "Rerun the same command to resume once the other run has ended."
            )

    try:
        yield check
    finally:
        if lease is not None:
            lease.release()
