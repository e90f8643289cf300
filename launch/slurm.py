"""SLURM batch scripts for lmjax: `srun` starts one task per GPU (or one per node).

    python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --venv /shared/lmjax-venv \\
        -- lmjax train --experiment llama_1b --workdir /shared/runs/x > job.sbatch
    sbatch job.sbatch

The tasks run lmjax from a Python 3.12 environment on shared storage (--venv, or
LMJAX_VENV for the checked-in script): `uv venv --python 3.12 /shared/lmjax-venv` and
`uv pip install --python /shared/lmjax-venv/bin/python -e '.[gpu]'` in a checkout.

launch/slurm.sbatch is this script rendered with the defaults; it runs the command given to
sbatch: `sbatch --nodes=4 --partition=gpu launch/slurm.sbatch lmjax train ...`.

Inside each task jax reads SLURM_* (coordinator = first node of the step, process id =
SLURM_PROCID). One task per GPU: jax gives task SLURM_LOCALID the GPU of that number. One task
per node (--tasks node): JAX_LOCAL_DEVICE_IDS lets each task drive all GPUs of its node.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

TEMPLATE = """\
#!/bin/bash
# lmjax on SLURM ({layout}), rendered by launch/slurm.py.
# jax.distributed reads SLURM_* in each task (lmjax/parallel/distributed.py); re-submitting the same
# command with the same run workdir resumes from its newest checkpoint.
{alternative}#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --time={time}
#SBATCH --output=%x-%j.out
{partition_line}set -euo pipefail
{venv_line}{env_lines}{run_line}
"""

# The environment lmjax is installed in (Python >= 3.12): baked in, or LMJAX_VENV at submit.
_VENV_FROM_ENV = """\
if [ -n "${LMJAX_VENV:-}" ]; then source "$LMJAX_VENV/bin/activate"; fi
"""

_ARGS_RUN = """\
if [ "$#" -eq 0 ]; then
  echo "usage: sbatch launch/slurm.sbatch lmjax train --experiment X ..." >&2
  exit 2
fi
srun --kill-on-bad-exit=1 "$@\""""


def render(
    command: Sequence[str] | None = None,
    *,
    nodes: int = 2,
    gpus_per_node: int = 8,
    tasks: str = "gpu",
    partition: str | None = None,
    time: str = "24:00:00",
    job_name: str = "lmjax",
    venv: str | None = None,
) -> str:
    """The sbatch script. command None: run the script's own arguments (sbatch FILE CMD...).
    venv: the Python environment to activate (default: $LMJAX_VENV when set at submission).

    tasks: "gpu" (one task per GPU, the usual jax GPU layout) or "node" (one per node).
    """
    if tasks not in ("gpu", "node"):
        raise ValueError(f"tasks={tasks!r}: use 'gpu' (one task per GPU) or 'node'")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"need nodes >= 1 and gpus_per_node >= 1, got {nodes}, {gpus_per_node}")
    for name, value in (("partition", partition), ("time", time), ("job_name", job_name)):
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError(f"{name}={value!r}: must be one word (it goes on an #SBATCH line)")
    if command is not None and not command:
        raise ValueError("empty command: give e.g. lmjax train --experiment X")
    per_gpu = tasks == "gpu"
    env_lines = (
        ""
        if per_gpu
        else (f"export JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(gpus_per_node)))}\n")
    )
    run_line = _ARGS_RUN if command is None else f"srun --kill-on-bad-exit=1 {shlex.join(command)}"
    return TEMPLATE.format(
        layout=("one task per GPU" if per_gpu else "one task per node, all its GPUs"),
        job_name=job_name,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        time=time,
        tasks_per_node=gpus_per_node if per_gpu else 1,
        partition_line=f"#SBATCH --partition={partition}\n" if partition else "",
        env_lines=env_lines,
        run_line=run_line,
        venv_line=(f"source {shlex.quote(venv + '/bin/activate')}\n" if venv else _VENV_FROM_ENV),
        alternative=(
            "# One task per node instead (each drives all GPUs of its node): "
            "python launch/slurm.py --tasks node\n"
            if per_gpu
            else ""
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Print an sbatch script that runs a command with srun on every GPU (or node)."
    )
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument(
        "--tasks",
        choices=("gpu", "node"),
        default="gpu",
        help="one task per GPU (default) or one task per node",
    )
    p.add_argument("--partition")
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--job-name", default="lmjax")
    p.add_argument(
        "--venv",
        help="Python >= 3.12 environment with lmjax installed, on storage "
        "every node sees (default: $LMJAX_VENV at submission)",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="-- lmjax train ... (omit: the script runs its own arguments)",
    )
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        script = render(
            command or None,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            tasks=args.tasks,
            partition=args.partition,
            time=args.time,
            job_name=args.job_name,
            venv=args.venv,
        )
    except ValueError as e:
        p.error(str(e))
    sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
