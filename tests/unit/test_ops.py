"""Operations: goodput accounting over a crash and a resume, the profile trace's named
scopes, and the persistent compilation cache in fresh processes.

One run of the smoke experiment (packaged corpus, real tf.data and orbax) crashes at step 7
(a hook raises, after checkpoint 4) while tracing steps 2-3; a second call resumes it from
step 4, redoing steps 5 and 6.
"""

import glob
import os
import time
from pathlib import Path

import pytest

from lmjax import cli
from lmjax.commands.experiment import load_experiment
from lmjax.observe import goodput, metrics, report, wandb_log
from lmjax.train import run
from lmjax.train.loop import Hook
from lmjax.workdir_names import WANDB_RUN_ID

STEPS, CRASH = 10, 7


SETS = [
    f"run.steps={STEPS}",
    "run.log_every=1",
    "checkpoint.every_steps=4",
    "run.eval_every=0",
    "run.eval_batches=1",
    "run.profile_steps=2:4",
    "run.wandb_project=lmjax-test",
]


class _Crash(Hook):
    def after_step(self, step, state, metrics):
        if step == CRASH:
            raise RuntimeError("injected crash")
        return False


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """(workdir, [wall seconds of each train() call])."""
    workdir = str(tmp_path_factory.mktemp("ops"))
    config = load_experiment("smoke", SETS)
    walls = []
    with pytest.MonkeyPatch.context() as env:
        env.delenv("WANDB_API_KEY", raising=False)
        env.delenv("WANDB_MODE", raising=False)
        if wandb_log._has_api_key():  # a `wandb login` on this machine: stay offline anyway
            env.setenv("WANDB_MODE", "offline")
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match="injected crash"):
            run.train(config, workdir, hooks=(_Crash(),))
        walls.append(time.perf_counter() - start)
        start = time.perf_counter()
        run.train(config, workdir)
        walls.append(time.perf_counter() - start)
    return workdir, walls


def test_report_prints_totals_and_writes_a_png(crashed_and_resumed, capsys):
    workdir, walls = crashed_and_resumed
    assert cli.main(["report", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    total = goodput.summarize(metrics.read_records(workdir))
    assert "2 start(s), step 10" in out
    assert f"goodput (training steps / wall time): {total['goodput']:.1%}" in out
    for label in report.LABELS.values():
        assert label in out
    png = Path(workdir) / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_wandb_offline_run_resumed_under_one_id(crashed_and_resumed):
    workdir, _ = crashed_and_resumed
    run_id = (Path(workdir) / WANDB_RUN_ID).read_text().strip()
    runs = sorted((Path(workdir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    logged = [(r / f"run-{run_id}.wandb").read_bytes() for r in runs]
    assert all(b"goodput/train_s" in data and b"loss" in data for data in logged)
    assert b"eval_loss" in logged[1]  # the evaluation at the end of the resumed start


def _hlo_op_names(xplane_path: str) -> set[str]:
    """The op_name metadata of every HLO module recorded in a profile (XSpace)."""
    from tensorflow.compiler.xla.service import hlo_pb2
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with open(xplane_path, "rb") as f:
        space = xplane_pb2.XSpace.FromString(f.read())
    names = set()
    for plane in space.planes:
        hlo_stat = [k for k, m in plane.stat_metadata.items() if m.name == "Hlo Proto"]
        for event in plane.event_metadata.values():
            for stat in event.stats:
                if stat.metadata_id in hlo_stat:
                    module = hlo_pb2.HloProto.FromString(stat.bytes_value).hlo_module
                    names.update(
                        i.metadata.op_name for c in module.computations for i in c.instructions
                    )
    return names


def test_profile_trace_has_the_named_scopes(crashed_and_resumed):
    workdir, _ = crashed_and_resumed
    traces = glob.glob(
        os.path.join(workdir, "tensorboard", "plugins", "profile", "*", "*.xplane.pb")
    )
    assert len(traces) == 1, traces  # only the first start traced (the resume began at 5)
    step_ops = [n for n in _hlo_op_names(traces[0]) if "step_with_rules" in n]
    for scope in ("attention", "mlp", "loss", "optimizer"):
        assert any(f"/{scope}/" in n or f"({scope})" in n for n in step_ops), scope
