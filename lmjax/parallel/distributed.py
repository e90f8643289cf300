"""Multi-process start-up: one call, first thing in every entry point.

`initialize()` decides how this process meets its peers, in this order:

1. explicit: `coordinator_address` / `num_processes` / `process_id` arguments, or the
   environment variables LMJAX_COORDINATOR, LMJAX_NUM_PROCESSES, LMJAX_PROCESS_ID (what
   `launch/local.py` sets); CPU collectives use gloo;
2. SLURM: inside `srun` with more than one task (jax reads SLURM_* itself and gives each
   task the GPU numbered by SLURM_LOCALID, or JAX_LOCAL_DEVICE_IDS when set);
3. Cloud TPU VM or GKE TPU pod: jax reads worker lists (and MEGASCALE_* for multi-slice)
   from the TPU metadata or the pod environment;
4. otherwise a single process: nothing to join.

LMJAX_LOCAL_DEVICES=M (or `local_device_count=M`) gives this process M CPU devices.
If peers do not all arrive within the timeout (LMJAX_INIT_TIMEOUT, default 300 s), the
process prints what it waited for and what to check, and exits with code 75. An explicit
process 0 that finds its coordinator address already answering (a second process claiming
index 0) refuses to start instead. Once joined, `lmjax.parallel.agreement` checks that the
processes agree (counts, devices, config) before anything compiles.

A peer that dies later (SIGKILL, a lost host) stops sending heartbeats to the coordination
service; once LMJAX_HEARTBEAT_TIMEOUT seconds (default 100) pass without one, jax terminates
every surviving process (SIGABRT, exit 134) with "The following tasks are unhealthy (stopped
sending heartbeats): N", naming the lost process. Without this a survivor would wait in its
next collective forever. Committed checkpoints are untouched; rerunning the command resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
from typing import Any, Callable, Mapping

import jax

from lmjax.config import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0
# EX_TEMPFAIL: a supervisor may retry; distinct from a crash inside the run.
RENDEZVOUS_TIMEOUT_EXIT = 75
# jax aborts the whole process (no Python exception) when its own deadline passes, so its
# deadline is set later than ours and the watchdog below explains the failure first.
_JAX_DEADLINE_GRACE_S = 30

ENV_COORDINATOR = "LMJAX_COORDINATOR"
ENV_NUM_PROCESSES = "LMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LMJAX_PROCESS_ID"
ENV_LOCAL_DEVICES = "LMJAX_LOCAL_DEVICES"
ENV_TIMEOUT = "LMJAX_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "LMJAX_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
_SLURM_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """How this process joins the others.

    kind: "single" | "explicit" | "slurm" | "tpu". For "slurm" and "tpu" jax fills in the
    fields it can read from the cluster, so they may be None here.
    """

    kind: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def _int_setting(value: int | str | None, env: Mapping[str, str], name: str) -> int | None:
    if value is not None:
        return int(value)
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not an integer; set it to a whole number or unset it"
        ) from None


def choose_rendezvous(
    env: Mapping[str, str],
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    on_cloud_tpu: bool = False,
) -> Rendezvous:
    """Choose explicit / SLURM / TPU / single from arguments and `env`; validate explicit.

    Arguments win over LMJAX_* variables. Pure: no jax calls, no network.
    """
    coordinator = coordinator_address or env.get(ENV_COORDINATOR, "").strip() or None
    n = _int_setting(num_processes, env, ENV_NUM_PROCESSES)
    pid = _int_setting(process_id, env, ENV_PROCESS_ID)
    if coordinator is not None or n is not None or pid is not None:
        if n == 1 and pid in (None, 0):
            return Rendezvous("single", num_processes=1, process_id=0)
        if coordinator is None or n is None or pid is None:
            missing = [
                name
                for name, v in (
                    (ENV_COORDINATOR, coordinator),
                    (ENV_NUM_PROCESSES, n),
                    (ENV_PROCESS_ID, pid),
                )
                if v is None
            ]
            raise ConfigError(
                f"explicit multi-process start needs all of {ENV_COORDINATOR}, "
                f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or the matching "
                f"arguments); missing {missing}. launch/local.py sets all three."
            )
        host, sep, port = coordinator.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(
                f"coordinator address {coordinator!r} must be host:port, "
                f"e.g. 10.0.0.2:8476 (the address of process 0)"
            )
        if n < 1 or not 0 <= pid < n:
            raise ConfigError(
                f"process id {pid} with {n} processes: need num_processes >= 1 "
                f"and 0 <= process_id < num_processes"
            )
        return Rendezvous("explicit", coordinator, n, pid)
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        missing = [v for v in _SLURM_STEP_VARS if v not in env]
        if missing:
            raise ConfigError(
                f"SLURM job with SLURM_NTASKS={env['SLURM_NTASKS']} but {missing} "
                f"are unset: start each task with `srun` (see "
                f"launch/slurm.sbatch), not directly from the batch script"
            )
        return Rendezvous(
            "slurm", num_processes=int(env["SLURM_NTASKS"]), process_id=int(env["SLURM_PROCID"])
        )
    if on_cloud_tpu:
        return Rendezvous("tpu")
    return Rendezvous("single", num_processes=1, process_id=0)


def require_one_process(command: str, env: Mapping[str, str]) -> None:
    """Refuses (ConfigError) a start of `command` as several processes by launch/local.py
    (LMJAX_*) or `srun` (SLURM_*), read from `env` alone: no join, no device touched. For
    commands that use no devices and write one output, which every process would write.
    A TPU pod's worker count is only known by joining, so a start there is not refused; a
    SLURM batch script outside `srun` (no step variables) is one process, whatever its job's
    task count."""
    if not all(v in env for v in _SLURM_STEP_VARS):
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    r = choose_rendezvous(env)
    if (r.num_processes or 1) > 1:
        raise ConfigError(
            f"{command} was started as {r.num_processes} processes ({r.kind} start), each "
            f"of which would write the same output: run it as one process (without "
            f"launch/local.py or srun; on a TPU pod, on one worker)"
        )


def _on_cloud_tpu() -> bool:
    """Whether jax found TPU chips and libtpu at import (it then auto-detects TPU peers)."""
    from jax._src import cloud_tpu_init  # jax has no public accessor for this flag

    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)


def _port_open(address: str, timeout_s: float = 2.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def rendezvous_hint(
    r: Rendezvous, timeout_s: float, port_open: Callable[[str], bool] = _port_open
) -> str:
    """What this process waited for and what to check, after peers failed to arrive."""
    head = (
        f"lmjax.parallel.distributed: peers did not arrive within {timeout_s:g} s ({r.kind} start"
    )
    wait = f" To wait longer, set {ENV_TIMEOUT} (seconds)."
    if r.kind == "explicit":
        n, address = r.num_processes, r.coordinator_address
        assert n is not None and address is not None  # an explicit start has both (_rendezvous)
        check = (
            f"Check: all {n} processes were started with "
            f"{ENV_COORDINATOR}={address} {ENV_NUM_PROCESSES}={n} "
            f"and distinct {ENV_PROCESS_ID} 0..{n - 1}; none crashed before "
            f"initialize (read their logs); firewalls allow the port."
        )
        if r.process_id == 0:
            where = (
                f"This is process 0 of {n}, hosting the coordinator at "
                f"{address}; not all of the other {n - 1} process(es) "
                f"registered (jax does not say which)."
            )
        elif port_open(address):
            where = (
                f"This is process {r.process_id} of {n}; the coordinator at "
                f"{address} accepts connections but not all "
                f"{n} processes registered with it."
            )
        else:
            where = (
                f"This is process {r.process_id} of {n}; nothing answers at "
                f"{address}: process 0 is not running yet, died, or that "
                f"host:port is wrong or unreachable from here."
            )
        return f"{head}). {where} {check}{wait}"
    if r.kind == "slurm":
        return (
            f"{head}, task {r.process_id} of {r.num_processes}). jax's coordinator runs on "
            f"the first node of SLURM_STEP_NODELIST at a port derived from SLURM_JOB_ID "
            f"(override with JAX_COORDINATOR_PORT). Check that every task of the step "
            f"started (squeue/sacct), that nodes reach each other on that port, and the "
            f"logs of task 0.{wait}"
        )
    return (
        f"{head}). jax's coordinator runs on worker 0 (port 8482; MEGASCALE_COORDINATOR_"
        f"ADDRESS for multi-slice). Check that the same command was started on every "
        f"worker (gcloud ... ssh --worker=all) of every slice, and the logs of worker 0.{wait}"
    )


def _exit_on_timeout(timeout_s: float, hint: Callable[[], str]) -> threading.Event:
    """Start a watchdog; set the returned event once peers arrived, or it exits the process."""
    arrived = threading.Event()

    def watch():
        if not arrived.wait(timeout_s):
            sys.stderr.write(hint() + "\n")
            sys.stderr.flush()
            os._exit(RENDEZVOUS_TIMEOUT_EXIT)

    threading.Thread(target=watch, name="lmjax-rendezvous-watchdog", daemon=True).start()
    return arrived


def _set_local_device_count(count: int) -> None:
    if count < 1:
        raise ConfigError(f"{ENV_LOCAL_DEVICES}/local_device_count={count}: need at least 1 device")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:
        raise RuntimeError(
            f"cannot give this process {count} CPU devices: jax is already "
            f"running. Call lmjax.parallel.distributed.initialize() before any jax "
            f"computation, or set XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{count} before starting Python."
        ) from e


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    timeout_s: float | None = None,
) -> Rendezvous:
    """Join the other processes of this run (see the module docstring); no-op when alone.
    Returns how this process was started (what `lmjax.parallel.agreement` checks it against).

    Call before any jax computation. Calling it again after success does nothing.
    timeout_s: how long to wait for all peers (default `timeout()`); past it the process
    prints a hint and exits with RENDEZVOUS_TIMEOUT_EXIT.
    """
    env = os.environ
    if timeout_s is None:
        timeout_s = timeout()
    count = _int_setting(local_device_count, env, ENV_LOCAL_DEVICES)
    if count is not None:
        _set_local_device_count(count)
    r = choose_rendezvous(
        env, coordinator_address, num_processes, process_id, on_cloud_tpu=_on_cloud_tpu()
    )
    if r.kind != "single" and not jax.distributed.is_initialized():
        _join(r, env, timeout_s)
    where = f", coordinator {r.coordinator_address}" if r.coordinator_address else ""
    log.info(
        "process %d/%d (%s start%s): %d local %s devices, %d global",
        jax.process_index(),
        jax.process_count(),
        r.kind,
        where,
        jax.local_device_count(),
        jax.default_backend(),
        jax.device_count(),
    )
    return r


def timeout() -> float:
    """Seconds to wait for peers: LMJAX_INIT_TIMEOUT, or 300."""
    return float(os.environ.get(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S)


def _refuse_second_coordinator(r: Rendezvous, port_open: Callable[[str], bool]) -> None:
    """Process 0 hosts the coordinator; when something already answers at its address,
    another process claims index 0 (or an earlier run still holds the port), and joining would
    end in jax aborting both with "a request from a newer incarnation"."""
    if r.kind != "explicit" or r.process_id != 0:
        return
    n, address = r.num_processes, r.coordinator_address
    assert n is not None and address is not None  # an explicit start has both (_rendezvous)
    if port_open(address):
        raise ConfigError(
            f"this process has {ENV_PROCESS_ID}=0 and so hosts the coordinator, but something "
            f"already answers at {ENV_COORDINATOR}={address}: another process "
            f"claims index 0, or an earlier run still holds the port. Give each process a "
            f"distinct {ENV_PROCESS_ID} 0..{n - 1} (only the one on the "
            f"coordinator's host is 0), or stop the earlier run"
        )


def _join(r: Rendezvous, env, timeout_s: float) -> None:
    """`jax.distributed.initialize` for rendezvous `r`, with lmjax's timeouts; exits with a
    hint when the peers do not all arrive within `timeout_s`."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "lmjax.parallel.distributed.initialize() must run before any jax "
            "computation (jax.devices(), jnp arrays, ...): move the call "
            "to the top of the entry point"
        )
    _refuse_second_coordinator(r, _port_open)
    heartbeat = _int_setting(None, env, ENV_HEARTBEAT_TIMEOUT) or DEFAULT_HEARTBEAT_TIMEOUT_S
    kwargs: dict[str, Any] = {
        "initialization_timeout": int(timeout_s) + _JAX_DEADLINE_GRACE_S,
        "heartbeat_timeout_seconds": heartbeat,
    }
    # CPU devices need gloo for cross-process collectives: set it rather than rely on
    # jax's default.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if r.kind == "explicit":
        kwargs.update(
            coordinator_address=r.coordinator_address,
            num_processes=r.num_processes,
            process_id=r.process_id,
            cluster_detection_method="deactivate",
        )
    arrived = _exit_on_timeout(timeout_s, lambda: rendezvous_hint(r, timeout_s))
    try:
        jax.distributed.initialize(**kwargs)
    finally:
        arrived.set()


def is_primary() -> bool:
    """True on the process that writes logs and metrics (process index 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op when alone); `name` must be
    the same on every process and distinct from other barriers in flight."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_copy(x: Any) -> Any:
    """The whole of array `x` as numpy, on every process: a gather over the processes when
    some of its shards live on other processes' devices (then every process must call this,
    in the same order), a plain copy otherwise. Host memory: one copy of `x`."""
    import numpy as np

    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
