"""Cloud TPU VMs: create, install lmjax, run the same command on every worker, supervise, delete.

    python launch/tpu.py create  --name NAME --zone Z --project P --accelerator-type v5p-64 [--spot]
    python launch/tpu.py install --name NAME --zone Z --project P [--source DIR | --git URL@REV]
    python launch/tpu.py run     --name NAME --zone Z --project P -- lmjax train ...
    python launch/tpu.py supervise ... -- lmjax train ...   # recreate + resume on preemption
    python launch/tpu.py delete  --name NAME --zone Z --project P

--num-slices K (> 1) makes a multi-slice queued resource (nodes NAME-0 .. NAME-{K-1}); the
TPU runtime puts MEGASCALE_COORDINATOR_ADDRESS / MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID in
each node's metadata, where jax and libtpu read them. --dry-run prints the gcloud commands.

TPU VM images ship Python 3.10 and lmjax needs 3.12, so `install` makes a uv-managed Python
3.12 environment in ~/lmjax-venv on every worker and installs this checkout (or a pinned git
revision) into it; `run` and `supervise` put that environment first on PATH.

`commands(args)` is pure: it returns the commands as argv lists; `main` executes them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lmjax.hardware import generation_of

RUN_LOG = "~/lmjax-run.log"
PYTHON = "3.12"  # lmjax's minimum (setup.cfg python_requires); TPU VM images have 3.10
VENV = "$HOME/lmjax-venv"  # on every worker, in double quotes inside the remote scripts
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_UV = (
    'export PATH="$HOME/.local/bin:$PATH"; command -v uv >/dev/null || '
    "curl -LsSf https://astral.sh/uv/install.sh | sh"
)
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?")
_HEALTHY = ("READY", "ACTIVE")  # tpu-vm state, queued-resource state
# EX_TEMPFAIL from lmjax: its progress watchdog fired (a hung process) or peers did not all
# arrive; the TPU is fine, so the same command is run again and resumes from its checkpoint.
RETRY_EXIT = 75
_QUEUE_POLL_S = 30


def _queued(args) -> bool:
    return args.queued or args.num_slices > 1


def nodes(args) -> list[str]:
    """TPU VM node names: NAME, or NAME-0 .. NAME-{K-1} for K slices."""
    if args.num_slices == 1:
        return [args.name]
    return [f"{args.name}-{i}" for i in range(args.num_slices)]


def _where(args) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def _gcloud_tpus(*words: str) -> list[str]:
    return ["gcloud", "compute", "tpus", *words]


def _ssh(args, node: str, script: str) -> list[str]:
    """Run `script` with bash on every worker of `node`. The --command string is parsed once
    more by the remote login shell, so the script travels as one quoted `bash -c` argument."""
    return _gcloud_tpus(
        "tpu-vm",
        "ssh",
        node,
        *_where(args),
        "--worker=all",
        "--command",
        f"bash -c {shlex.quote(script)}",
    )


def run_script(command: Sequence[str], stream: bool) -> str:
    """The bash script each worker runs: `command` (quoted word by word) with its output in
    ~/lmjax-run.log; with `stream`, worker 0 also prints it (so the ssh shows one worker)."""
    cmd = shlex.join(command)
    worker = (
        "$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/"
        "computeMetadata/v1/instance/attributes/agent-worker-number)"
    )
    lines = ["set -o pipefail", f'export PATH="{VENV}/bin:$HOME/.local/bin:$PATH"']
    if stream:
        lines += [
            f"worker={worker}",
            f'if [ "$worker" = 0 ]; then {cmd} 2>&1 | tee -a {RUN_LOG}; '
            f"else {cmd} >> {RUN_LOG} 2>&1; fi",
        ]
    else:
        lines.append(f"{cmd} >> {RUN_LOG} 2>&1")
    return "; ".join(lines)


def _tarball(args) -> str:
    return os.path.join(tempfile.gettempdir(), f"lmjax-src-{args.name}.tar.gz")


def create_commands(args) -> list[list[str]]:
    gen, _ = generation_of(args.accelerator_type)
    version = args.runtime_version or gen.runtime_version
    capacity = ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []
    if not _queued(args):
        return [
            _gcloud_tpus(
                "tpu-vm",
                "create",
                args.name,
                *_where(args),
                f"--accelerator-type={args.accelerator_type}",
                f"--version={version}",
                *capacity,
            )
        ]
    shape = (
        [f"--node-id={args.name}"]
        if args.num_slices == 1
        else [f"--node-count={args.num_slices}", f"--node-prefix={args.name}"]
    )
    describe = shlex.join(
        _gcloud_tpus(
            "queued-resources", "describe", args.name, *_where(args), "--format=value(state.state)"
        )
    )
    wait = (
        f'while :; do state=$({describe}); case "$state" in ACTIVE) exit 0;; '
        f'FAILED|SUSPENDED) echo "queued resource {args.name} is $state" >&2; exit 1;; '
        f'esac; echo "queued resource {args.name}: ${{state:-not found}}, waiting"; '
        f"sleep {_QUEUE_POLL_S}; done"
    )
    return [
        _gcloud_tpus(
            "queued-resources",
            "create",
            args.name,
            *_where(args),
            f"--accelerator-type={args.accelerator_type}",
            f"--runtime-version={version}",
            *shape,
            *capacity,
        ),
        ["bash", "-c", wait],
    ]


def venv_script(spec: str) -> str:
    """Worker script: uv (installed if missing), a Python 3.12 venv at ~/lmjax-venv, then
    `uv pip install` of `spec` into that venv's Python."""
    return (
        f'set -e; {_UV}; uv venv --allow-existing --python {PYTHON} "{VENV}"; '
        f'uv pip install --python "{VENV}/bin/python" --upgrade {shlex.quote(spec)}'
    )


def install_commands(args) -> list[list[str]]:
    """Default: this checkout, copied to every worker; --git URL@REV: that revision."""
    if args.git:
        spec = f"lmjax[tpu] @ git+{args.git}"
        return [_ssh(args, node, venv_script(spec)) for node in nodes(args)]
    tarball = _tarball(args)
    cmds = [
        [
            "tar",
            "-czf",
            tarball,
            "--exclude=.git",
            "--exclude=__pycache__",
            "--exclude=*.egg-info",
            "--exclude=./.venv",
            "--exclude=./runs",
            "-C",
            os.path.abspath(args.source),
            ".",
        ]
    ]
    unpack = (
        "rm -rf ~/lmjax-src && mkdir -p ~/lmjax-src && "
        "tar -xzf ~/lmjax-src.tar.gz -C ~/lmjax-src && cd ~/lmjax-src && " + venv_script(".[tpu]")
    )
    for node in nodes(args):
        cmds.append(
            _gcloud_tpus(
                "tpu-vm", "scp", tarball, f"{node}:lmjax-src.tar.gz", *_where(args), "--worker=all"
            )
        )
        cmds.append(_ssh(args, node, unpack))
    return cmds


def run_commands(args) -> list[list[str]]:
    """One ssh per slice, meant to run at the same time; slice 0 streams its worker 0."""
    if not args.command:
        raise ValueError("give the command to run after --, e.g. -- lmjax train --experiment X")
    return [
        _ssh(args, node, run_script(args.command, stream=(i == 0)))
        for i, node in enumerate(nodes(args))
    ]


def delete_commands(args) -> list[list[str]]:
    if _queued(args):
        return [
            _gcloud_tpus(
                "queued-resources", "delete", args.name, *_where(args), "--force", "--quiet"
            )
        ]
    return [_gcloud_tpus("tpu-vm", "delete", args.name, *_where(args), "--quiet")]


def status_command(args) -> list[str]:
    """Prints READY (tpu-vm) or ACTIVE (queued resource) while the TPU is usable."""
    if _queued(args):
        return _gcloud_tpus(
            "queued-resources", "describe", args.name, *_where(args), "--format=value(state.state)"
        )
    return _gcloud_tpus("tpu-vm", "describe", args.name, *_where(args), "--format=value(state)")


def recovery_commands(args) -> list[list[str]]:
    """After a preemption: delete what is left, create again, reinstall."""
    return delete_commands(args) + create_commands(args) + install_commands(args)


def commands(args) -> list[list[str]]:
    """Every command of `args.action`, in order (run: started together)."""
    if args.action == "supervise":
        return run_commands(args) + [status_command(args)] + recovery_commands(args)
    return {
        "create": create_commands,
        "install": install_commands,
        "run": run_commands,
        "delete": delete_commands,
    }[args.action](args)


def run_together(cmds: Sequence[Sequence[str]]) -> int:
    """Start all, wait; on the first failure stop the rest. Returns the first non-zero code."""
    procs = [subprocess.Popen(list(c)) for c in cmds]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                return failed[0] if failed else 0
            time.sleep(1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()


def run_each(cmds: Sequence[Sequence[str]]) -> int:
    for c in cmds:
        code = subprocess.call(list(c))
        if code:
            print(f"[tpu] failed ({code}): {shlex.join(c)}", file=sys.stderr)
            return code
    return 0


def _status(args) -> str:
    p = subprocess.run(status_command(args), capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else ""


def supervise(
    args,
    *,
    together: Callable = run_together,
    each: Callable = run_each,
    status: Callable = _status,
    sleep: Callable = time.sleep,
    log: Callable = print,
) -> int:
    """Run; when the run fails and the TPU is no longer READY/ACTIVE (preempted), wait,
    recreate, reinstall and run the same command again, up to args.max_restarts times.
    The command resumes from the newest checkpoint in its (gs://) workdir. Exit code
    RETRY_EXIT on a healthy TPU reruns in place (counted as a restart); any other failure on a
    healthy TPU is the run's own error and is returned, not retried."""
    restarts = 0
    while True:
        code = together(run_commands(args))
        if code == 0:
            return 0
        state = status(args)
        if state in _HEALTHY and code == RETRY_EXIT:
            restarts += 1
            if restarts > args.max_restarts:
                log(f"[tpu] giving up after {args.max_restarts} restarts")
                return code
            log(
                f"[tpu] run exited {code} (a hung process or a late peer) on a {state} TPU: "
                f"rerunning in place (restart {restarts}/{args.max_restarts})"
            )
            continue
        if state in _HEALTHY:
            log(
                f"[tpu] run failed with exit code {code} on a {state} TPU: not a preemption, "
                f"not restarting"
            )
            return code
        log(
            f"[tpu] run ended with exit code {code} and TPU {args.name} is "
            f"{state or 'gone'}: treating it as preempted"
        )
        while True:  # recreate until it works or the restarts run out
            restarts += 1
            if restarts > args.max_restarts:
                log(f"[tpu] giving up after {args.max_restarts} restarts")
                return code
            log(
                f"[tpu] recreating in {args.retry_wait:g} s "
                f"(restart {restarts}/{args.max_restarts})"
            )
            sleep(args.retry_wait)
            each(delete_commands(args))  # may fail: the TPU may already be gone
            code = each(create_commands(args)) or each(install_commands(args))
            if code == 0:
                break


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM / queued resource name")
    common.add_argument("--zone", required=True)
    common.add_argument("--project", required=True)
    common.add_argument("--accelerator-type", help="v5p-64, v5litepod-16, v6e-256, v4-32, ...")
    common.add_argument("--runtime-version", help="default: the usual one for the generation")
    common.add_argument(
        "--num-slices",
        type=int,
        default=1,
        help="> 1: multi-slice queued resource, nodes NAME-0..NAME-{K-1}",
    )
    capacity = common.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true")
    capacity.add_argument("--preemptible", action="store_true")
    common.add_argument(
        "--queued", action="store_true", help="create through a queued resource even for one slice"
    )
    common.add_argument("--dry-run", action="store_true", help="print commands, run nothing")
    install = argparse.ArgumentParser(add_help=False)
    what = install.add_mutually_exclusive_group()
    what.add_argument(
        "--source",
        default=CHECKOUT,
        help="lmjax checkout to copy to every worker and install (default: the "
        "one this launcher belongs to)",
    )
    what.add_argument(
        "--git",
        metavar="URL@REV",
        help="install this git revision instead, e.g. https://github.com/me/lmjax@3f2c1a0",
    )
    supervision = argparse.ArgumentParser(add_help=False)
    supervision.add_argument("--max-restarts", type=int, default=20)
    supervision.add_argument(
        "--retry-wait",
        type=float,
        default=120.0,
        help="seconds to wait before recreating a preempted TPU",
    )
    command = argparse.ArgumentParser(add_help=False)
    command.add_argument("command", nargs=argparse.REMAINDER, help="-- lmjax train ...")

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("create", parents=[common])
    sub.add_parser("install", parents=[common, install])
    sub.add_parser("run", parents=[common, command])
    sub.add_parser("delete", parents=[common])
    sub.add_parser("supervise", parents=[common, install, supervision, command])
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate; errors name the fix before any gcloud command runs."""
    p = parser()
    args = p.parse_args(argv)
    if hasattr(args, "command") and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    for attr in ("source", "git", "max_restarts", "retry_wait"):
        if not hasattr(args, attr):
            setattr(args, attr, None)
    longest = 60 - (len(str(args.num_slices)) + 1 if args.num_slices > 1 else 0)
    if not _NAME.fullmatch(args.name) or len(args.name) > longest:
        p.error(
            f"--name {args.name!r}: use lowercase letters, digits and '-', starting with a "
            f"letter, at most {longest} characters"
        )
    if args.num_slices < 1:
        p.error("--num-slices must be >= 1")
    if args.action in ("create", "supervise"):
        if not args.accelerator_type:
            p.error(f"{args.action} needs --accelerator-type (e.g. v5p-64)")
        try:
            generation_of(args.accelerator_type)
        except ValueError as e:
            p.error(str(e))
        if args.preemptible and _queued(args):
            p.error(
                "queued resources (--queued or --num-slices > 1) take --spot, not --preemptible"
            )
    if args.git and "@" not in args.git.split("://")[-1]:
        p.error(
            f"--git {args.git!r}: pin a revision, e.g. --git https://github.com/me/lmjax@3f2c1a0, "
            f"so that every worker (and every restart) installs the same code"
        )
    if (
        args.source is not None
        and not args.git
        and not os.path.isfile(os.path.join(args.source, "setup.cfg"))
    ):
        p.error(f"--source {args.source!r} is not an lmjax checkout (no setup.cfg there)")
    if args.action in ("run", "supervise") and not args.command:
        p.error("give the command to run after --, e.g. -- lmjax train --experiment X")
    return args


def dry_run_lines(args) -> list[str]:
    """The commands `args` would run, one shell-quoted line each, with # notes."""
    lines = [shlex.join(c) for c in commands(args)]
    if args.action == "supervise":
        n_run = len(run_commands(args))
        lines.insert(
            n_run,
            f"# if the run fails and this does not print "
            f"{' or '.join(_HEALTHY)}, wait {args.retry_wait:g} s, then delete, "
            f"create, install and run again (at most {args.max_restarts} times):",
        )
    if args.action in ("run", "supervise") and args.num_slices > 1:
        lines.insert(0, f"# the next {args.num_slices} commands run at the same time")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print("\n".join(dry_run_lines(args)))
        return 0
    if args.action == "supervise":
        return supervise(args)
    if args.action == "run":
        return run_together(run_commands(args))
    return run_each(commands(args))


if __name__ == "__main__":
    sys.exit(main())
