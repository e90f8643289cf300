"""`lmjax doctor` and the preflight of `lmjax train`: is this job set up to run? Cheap checks
only; nothing compiles.

- versions: jax, jaxlib, libtpu and the CUDA plugin against setup.cfg's tested ranges;
- devices: platform, device kind, local and global counts (and the platform expected);
- mesh: the config's mesh over these devices;
- attention: the implementation the model will run, refusing a kernel that this platform
  does not have;
- workdir, data stores (their root), compile cache: each reachable and writable (a probe file, local or gs://,
  deleted again);
- processes: on a multi-process job, that every process was started for the count that
  joined, sees the same devices, versions and config, and passed its own checks
  (`lmjax.parallel.agreement`). Every process reaches the same verdict, so a mismatch ends
  them all.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import jax

from lmjax import storage, versions
from lmjax.checkpoint import compat
from lmjax.config import Config, ConfigError, to_json
from lmjax.data import sources
from lmjax.model import attention
from lmjax.parallel import agreement, distributed, sharding
from lmjax.tools.checklist import Check, guard
from lmjax.train import compile_cache

log = logging.getLogger("lmjax")

PLATFORM_HINT = "is jax installed with the right extra: pip install 'lmjax[gpu]' or 'lmjax[tpu]'?"
WHY_XLA = {
    "gpu": "the GPU kernel needs data.seq_len divisible by 16",
    "tpu": "splash needs data.seq_len divisible by 128",
}


def _versions() -> Check:
    """Installed jax, jaxlib, libtpu and CUDA plugin against the installed lmjax's ranges."""
    ranges, found = versions.installed_ranges(), versions.installed_versions()
    seen = ", ".join(f"{k} {v}" for k, v in sorted(found.items()))
    if not ranges:
        return Check("versions", False, f"{seen}; lmjax is not installed: pip install -e .")
    problems = versions.problems(ranges, found)
    inside = ", ".join(f"{k}{s}" for k, s in sorted(ranges.items()))
    return Check("versions", not problems, "; ".join(problems) or f"{seen} (tested: {inside})")


def devices(expect_platform: str = "") -> Check:
    """The devices jax sees; failed when they are not on `expect_platform` (when given)."""
    device = jax.devices()[0]
    ok = not expect_platform or device.platform == expect_platform
    detail = (
        f"{jax.local_device_count()} local of {jax.device_count()} x {device.device_kind} "
        f"({device.platform}), process {jax.process_index()} of {jax.process_count()}"
    )
    if not ok:
        detail += f"; expected {expect_platform} -> {PLATFORM_HINT}"
    return Check("devices", ok, detail)


def _mesh(config: Config) -> Check:
    mesh = sharding.make_mesh(config.mesh)
    return Check("mesh", True, f"{dict(mesh.shape)} over {jax.device_count()} devices")


def attention_impl(config: Config, backend: str) -> str:
    """The attention implementation the model runs on `backend`, as it resolves
    `model.attention` for `data.seq_len`."""
    return attention.resolve_impl(config.model.attention, backend, config.data.seq_len)


def _attention(config: Config) -> Check:
    backend = jax.default_backend()
    impl = attention_impl(config, backend)
    if not attention.runs_on(impl, backend):
        return Check(
            "attention",
            False,
            f"model.attention={impl} runs only on {attention.KERNEL_PLATFORM[impl]}, this job "
            f"runs on {backend}; "
            f"use model.attention=auto",
        )
    why = WHY_XLA.get(backend) if impl == "xla" and config.model.attention == "auto" else None
    return Check("attention", True, impl + (f" ({why})" if why else ""))


def _writable(name: str, directory: str | None, unset: str) -> Check:
    """Writes, reads back and deletes a probe file in `directory`, or (a local directory that
    does not exist yet) in its nearest existing parent, so that nothing is left behind."""
    if directory is None:
        return Check(name, True, f"not used ({unset})")
    where = storage.path(directory)
    while not storage.is_url(directory) and not where.exists():
        where = where.parent
    probe = where / f".lmjax-doctor-{jax.process_index()}-{os.getpid()}"
    probe.write_text("lmjax")
    ok = probe.read_text() == "lmjax"
    probe.unlink()
    seen = (
        "is writable"
        if where == storage.path(directory)
        else f"can be created ({where} is writable)"
    )
    return Check(name, ok, f"{directory} {seen}" if ok else f"{probe} reads back wrong")


def _local_checks(config: Config, workdir: str, expect_platform: str) -> list[Check]:
    stores = sources.store_root(config.data, workdir) if workdir or config.data.store_dir else None
    where = "check the path, its permissions and (gs://) credentials"
    return [
        guard("versions", "reinstall: pip install -e .", _versions),
        guard("devices", PLATFORM_HINT, lambda: devices(expect_platform)),
        guard("mesh", "set mesh.* to fit the devices", lambda: _mesh(config)),
        guard("attention", "set model.attention", lambda: _attention(config)),
        guard("workdir", where, lambda: _writable("workdir", workdir or None, "no workdir")),
        guard(
            "data stores",
            where,
            lambda: _writable("data stores", stores, "no workdir or data.store_dir"),
        ),
        guard(
            "compile cache",
            where + "; or run.compile_cache_dir='' turns the cache off",
            lambda: _writable(
                "compile cache",
                compile_cache.resolve(config.run.compile_cache_dir),
                "run.compile_cache_dir=''",
            ),
        ),
    ]


def _processes(config: Config, started_for: int | None, local: list[Check]) -> Check:
    """Exchanges this process's report with every other process's (`agreement`)."""
    device = jax.local_devices()[0]
    facts = {
        "platform": device.platform,
        "device kind": device.device_kind,
        "local device count": str(jax.local_device_count()),
        "versions": json.dumps(versions.installed_versions(), sort_keys=True),
        "config": to_json(config),
    }
    mine = agreement.Report(
        jax.process_index(),
        socket.gethostname(),
        started_for,
        facts,
        tuple(f"{c.name}: {c.detail}" for c in local if not c.ok),
    )
    reports = agreement.exchange(mine, distributed.timeout())
    problems = agreement.disagreements(reports, jax.process_count())
    problems += agreement.peer_failures(reports, mine.index)
    if problems:
        return Check("processes", False, " | ".join(problems))
    return Check(
        "processes",
        True,
        f"{len(reports)} process(es) agree: {facts['local device count']} x "
        f"{facts['device kind']} each, config {compat.config_fingerprint(config)}",
    )


def run_checks(
    config: Config, workdir: str, started_for: int | None = None, expect_platform: str = ""
) -> list[Check]:
    """Every check, in the order of the module docstring. `started_for`: the process count
    this process was started with (`distributed.initialize()`'s `num_processes`)."""
    local = _local_checks(config, workdir, expect_platform)
    return [
        *local,
        guard(
            "processes",
            "read the other processes' logs",
            lambda: _processes(config, started_for, local),
        ),
    ]


def preflight(config: Config, workdir: str, started_for: int | None) -> None:
    """`run_checks` before training: logs them, and raises ConfigError naming every failed
    check (on every process of the job when they disagree)."""
    checks = run_checks(config, workdir, started_for)
    for c in checks:
        log.info("preflight %s %s: %s", "ok" if c.ok else "FAILED", c.name, c.detail)
    failed = [c for c in checks if not c.ok]
    if failed:
        raise ConfigError(
            "preflight failed (`lmjax doctor` runs the same checks):\n"
            + "\n".join(f"  {c.name}: {c.detail}" for c in failed)
        )
