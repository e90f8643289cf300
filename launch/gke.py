"""GKE: a JobSet manifest that runs the same lmjax command on every host of K TPU slices.

    docker build -f docker/Dockerfile --build-arg EXTRA=tpu -t IMAGE . && docker push IMAGE
    python launch/gke.py --name run1 --accelerator-type v5p-64 --num-slices 2 \\
        --image IMAGE --dry-run -- lmjax train --experiment llama3_8b --workdir gs://b/runs/x
    python launch/gke.py ... -- lmjax train ...   # kubectl apply -f - on the current context

The image is this checkout installed on Python 3.12 (docker/Dockerfile); the pods run the
command in it as it is, installing nothing at start.

One replicated Job per slice (replicas = slices), one pod per host (parallelism = completions
= hosts per slice), each pod asking for the host's chips (google.com/tpu). GKE's TPU webhook
gives every pod TPU_WORKER_ID / TPU_WORKER_HOSTNAMES and, for several slices, MEGASCALE_*;
`lmjax.parallel.distributed.initialize()` lets jax read them. The JobSet restarts all pods on any
failure (up to --max-restarts); the run resumes from its checkpoint in the gs:// workdir.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lmjax.hardware import slice_shape

_NAME = re.compile(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?")
# TPU runtime, multi-slice (megascale) and TPU metrics ports.
_TPU_PORTS = (8471, 8080, 8431)


def container_script(command: Sequence[str]) -> str:
    """bash script run by each pod: the command, quoted word by word."""
    return "exec " + shlex.join(command)


def jobset(args) -> dict:
    """The JobSet object (a plain dict) for `args`."""
    shape = slice_shape(args.accelerator_type, args.topology)
    node_selector = {
        "cloud.google.com/gke-tpu-accelerator": shape.generation.gke_accelerator,
        "cloud.google.com/gke-tpu-topology": shape.topology,
    }
    pod_spec = {
        "restartPolicy": "Never",
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        "nodeSelector": node_selector,
        "containers": [
            {
                "name": "lmjax",
                "image": args.image,
                "command": ["bash", "-c", container_script(args.command)],
                "ports": [{"containerPort": p} for p in _TPU_PORTS],
                "resources": {"limits": {"google.com/tpu": shape.chips_per_host}},
            }
        ],
    }
    if args.spot:
        node_selector["cloud.google.com/gke-spot"] = "true"
        pod_spec["tolerations"] = [
            {
                "key": "cloud.google.com/gke-spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoSchedule",
            }
        ]
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            "name": args.name,
            "annotations": {
                # One slice per node pool: a slice's pods share one ICI domain.
                "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
            },
        },
        "spec": {
            "failurePolicy": {"maxRestarts": args.max_restarts},
            "replicatedJobs": [
                {
                    "name": "slice",
                    "replicas": args.num_slices,
                    "template": {
                        "spec": {
                            "parallelism": shape.hosts,
                            "completions": shape.hosts,
                            "backoffLimit": 0,
                            "template": {"spec": pod_spec},
                        }
                    },
                }
            ],
        },
    }


def xpk_command(args) -> list[str]:
    """The equivalent `xpk workload create` (xpk builds a similar JobSet itself)."""
    cmd = [
        "xpk",
        "workload",
        "create",
        f"--cluster={args.cluster or 'CLUSTER_NAME'}",
        f"--workload={args.name}",
        f"--tpu-type={args.accelerator_type}",
        f"--num-slices={args.num_slices}",
        f"--docker-image={args.image}",
        f"--max-restarts={args.max_restarts}",
        f"--command={container_script(args.command)}",
    ]
    if args.project:
        cmd.append(f"--project={args.project}")
    if args.zone:
        cmd.append(f"--zone={args.zone}")
    return cmd


def manifest(args) -> str:
    """YAML text: a comment header (shape, xpk equivalent) and the JobSet."""
    shape = slice_shape(args.accelerator_type, args.topology)
    header = (
        f"lmjax: {args.num_slices} slice(s) of {args.accelerator_type} (topology "
        f"{shape.topology}, {shape.hosts} host(s) x {shape.chips_per_host} chips)\n"
        f"apply: kubectl apply -f THIS_FILE\n"
        f"equivalent: {shlex.join(xpk_command(args))}"
    )
    # Every header line is commented, even lines a newline inside the command starts.
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(jobset(args), sort_keys=False)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="JobSet name (lowercase, digits, '-')")
    p.add_argument("--accelerator-type", required=True, help="v5p-64, v5litepod-16, v6e-256, ...")
    p.add_argument("--topology", help="override the default topology for the chip count")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument(
        "--image",
        required=True,
        help="container image with lmjax installed, built from this checkout: "
        "docker build -f docker/Dockerfile --build-arg EXTRA=tpu -t IMAGE .",
    )
    p.add_argument("--spot", action="store_true", help="schedule on spot TPU node pools")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=10,
        help="JobSet restarts of all pods after a failure or preemption",
    )
    p.add_argument("--cluster", help="GKE cluster name, for the xpk command")
    p.add_argument("--project")
    p.add_argument("--zone")
    p.add_argument("--dry-run", action="store_true", help="print the manifest, apply nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- lmjax train ...")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        p.error("give the command after --, e.g. -- lmjax train --experiment X")
    if not _NAME.fullmatch(args.name):
        p.error(
            f"--name {args.name!r}: use at most 40 lowercase letters, digits and '-', "
            f"starting with a letter"
        )
    if args.num_slices < 1 or args.max_restarts < 0:
        p.error("--num-slices must be >= 1 and --max-restarts >= 0")
    try:
        shape = slice_shape(args.accelerator_type, args.topology)
    except ValueError as e:
        p.error(str(e))
    if args.num_slices > 1 and shape.hosts == 1:
        p.error(
            f"multi-slice on GKE needs multi-host slices; {args.accelerator_type} is one "
            f"host: use a larger accelerator type or --num-slices 1"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    text = manifest(args)
    if args.dry_run:
        print(text, end="")
        return 0
    return subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True).returncode


if __name__ == "__main__":
    sys.exit(main())
