"""Kill soak: SIGKILL `lmjax train` at chosen moments, rerun the same command, and require
every logged loss to equal an uninterrupted run's bit for bit.

Moments, in turn: during the first save (no checkpoint committed yet), during a later
asynchronous save, and after a random logged step. Whether a kill really landed inside a
save is read from the disk afterwards: orbax writes a save under a temporary name and
renames it on commit, so a temporary directory left behind proves the save was cut.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

from etils.epath import Path

from lmjax.observe import metrics
from lmjax.workdir_names import CHECKPOINTS, TOKENIZER

MOMENTS = ("first save", "async save", "random step")
_POLL_S = 0.002


def train_command(workdir: Path, experiment: str, overrides: list[str]) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return [
        sys.executable,
        "-m",
        "lmjax",
        "train",
        "--experiment",
        experiment,
        "--workdir",
        str(workdir),
        *sets,
    ]


def losses(workdir: Path) -> dict[int, list[float]]:
    """Every logged loss of each step, in log order (a replayed step appears twice)."""
    out: dict[int, list[float]] = {}
    for record in metrics.read_records(workdir, missing_ok=True):
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def _dirs(workdir: Path) -> tuple[list[str], list[str]]:
    """(committed step names, unfinished save names) under workdir/checkpoints."""
    try:
        names = [p.name for p in (workdir / CHECKPOINTS).iterdir()]
    except FileNotFoundError:
        return [], []
    return [n for n in names if n.isdigit()], [n for n in names if "tmp" in n]


def _wait(predicate, proc: subprocess.Popen, timeout_s: float) -> bool:
    """Polls `predicate` until true; False if the run ended or the time ran out first."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(_POLL_S)
    return True


def kill_at(
    moment: str,
    cmd: list[str],
    env: dict,
    workdir: Path,
    steps: int,
    rng: random.Random,
    timeout_s: float = 600,
) -> dict:
    """Starts `cmd`, SIGKILLs it at `moment`; returns what the kill hit."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if moment == "first save":
            _wait(lambda: _dirs(workdir)[1] and not _dirs(workdir)[0], proc, timeout_s)
        elif moment == "async save":
            if _wait(lambda: _dirs(workdir)[0], proc, timeout_s):
                seen = set(_dirs(workdir)[0])
                _wait(
                    lambda: any(n.split(".")[0] not in seen for n in _dirs(workdir)[1]),
                    proc,
                    timeout_s,
                )
        else:
            target = rng.randint(2, steps - 1)
            _wait(lambda: max(losses(workdir), default=0) >= target, proc, timeout_s)
            time.sleep(rng.uniform(0.0, 0.3))
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    committed, unfinished = _dirs(workdir)
    return {
        "moment": moment,
        "killed": alive,
        "logged": max(losses(workdir), default=0),
        "committed": sorted(map(int, committed)),
        "save_cut": bool(unfinished),
    }


def run_trial(
    moment: str,
    cmd: list[str],
    env: dict,
    workdir: Path,
    steps: int,
    reference: dict[int, list[float]],
    rng: random.Random,
) -> dict:
    """One kill and the rerun; `ok` when every logged loss equals the reference's."""
    row = kill_at(moment, cmd, env, workdir, steps, rng)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    got = losses(workdir)
    starts = [
        r for r in metrics.read_records(workdir, missing_ok=True) if r.get("event") == "start"
    ]
    row.update(
        rerun_exit=rerun.returncode,
        restored=starts[-1]["restored_step"] if starts else 0,
        equal=sorted(got) == list(range(1, steps + 1))
        and all(v == reference[s][0] for s, vs in got.items() for v in vs),
    )
    row["ok"] = row["killed"] and rerun.returncode == 0 and row["equal"]
    if rerun.returncode:
        row["error"] = rerun.stderr.strip().splitlines()[-1:] if rerun.stderr else []
    return row


def soak(
    root: Path,
    trials: int,
    experiment: str = "smoke",
    overrides: Sequence[str] = (),
    steps: int = 12,
    every: int = 4,
    seed: int = 0,
    env: dict | None = None,
    on_trial: Callable[[int, dict], object] | None = None,
) -> list[dict]:
    """Runs the reference, then `trials` kill-and-resume trials cycling through MOMENTS;
    `on_trial(i, row)` sees each trial's row as soon as it is done (e.g. to print it)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    base = [
        *overrides,
        f"run.steps={steps}",
        f"checkpoint.every_steps={every}",
        "run.log_every=1",
        "run.eval_batches=1",
    ]
    ref_dir = root / "reference"
    done = subprocess.run(
        train_command(ref_dir, experiment, base),
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode:
        raise RuntimeError(f"the reference run failed: {done.stderr[-2000:]}")
    reference = losses(ref_dir)
    if (ref_dir / TOKENIZER).exists():  # reuse its tokenizer and prepared data
        base += [
            f"data.tokenizer={ref_dir / TOKENIZER}",
            f"data.store_dir={ref_dir / 'data'}",
        ]
    rng = random.Random(seed)
    rows = []
    for i in range(trials):
        workdir = root / f"trial{i}"
        rows.append(
            run_trial(
                MOMENTS[i % len(MOMENTS)],
                train_command(workdir, experiment, base),
                env,
                workdir,
                steps,
                reference,
                rng,
            )
        )
        if on_trial is not None:
            on_trial(i, rows[-1])
    return rows


def format_row(i: int, r: dict) -> str:
    """One line of trial `i`'s row `r`: what the kill hit and whether the rerun was exact."""
    return (
        f"trial {i:2d}  {r['moment']:<11}  killed after step {r['logged']:>3}  committed "
        f"{r['committed']}  save cut: {'yes' if r['save_cut'] else 'no '}  restored "
        f"{r['restored']:>3}  {'bitwise equal' if r['equal'] else 'DIFFERENT'}  "
        f"{'ok' if r['ok'] else 'FAILED ' + str(r.get('error', ''))}"
    )
