"""Operations: goodput accounting over a crash and a resume, the profile trace's named
scopes, and the persistent compilation cache in fresh processes.

One run of the smoke experiment (packaged corpus, real tf.data and orbax) crashes at step 7
(a hook raises, after checkpoint 4) while tracing steps 2-3; a second call resumes it from
step 4, redoing steps 5 and 6.
"""

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmjax import cli
from lmjax.observe import goodput, metrics, report, wandb_log
from lmjax.train import run
from lmjax.train.loop import Hook
from lmjax.workdir_names import WANDB_RUN_ID

REPO = Path(__file__).resolve().parent.parent
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
# Seconds of the two starts that fall outside every goodput clock: 0.09 s measured on the
# 2-core CI machine, so 0.5 s leaves room under load and still fails if the clock started
# after start-up and compilation (over 7 s here) or stopped before the last save.
OUTSIDE_CLOCKS_S = 0.5


class _Crash(Hook):
    def after_step(self, step, state, metrics):
        if step == CRASH:
            raise RuntimeError("injected crash")
        return False


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """(workdir, [wall seconds of each train() call])."""
    workdir = str(tmp_path_factory.mktemp("ops"))
    config = cli.load_experiment("smoke", SETS)
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


@pytest.mark.slow
def test_goodput_buckets_add_up_to_wall_time_across_a_restart(crashed_and_resumed):
    workdir, walls = crashed_and_resumed
    records = metrics.read_records(workdir)
    finals = {}
    for r in records:
        if r.get("event") == goodput.EVENT:
            finals[r["run_start"]] = r
    assert len(finals) == 2
    first, second = (finals[k] for k in sorted(finals))
    buckets = [sum(final[f"goodput/{b}_s"] for b in goodput.BUCKETS) for final in (first, second)]
    # The run as a whole (both starts), within 1% or OUTSIDE_CLOCKS_S: the walls also hold
    # what no clock inside run.train() can see, a fixed cost per start whatever the run's
    # length (the call itself; after the final record, releasing the compiled step, the state
    # and the data readers; for the crash, unwinding the exception).
    assert sum(buckets) == pytest.approx(sum(walls), rel=0.01, abs=OUTSIDE_CLOCKS_S), (
        buckets,
        walls,
    )
    for final, in_buckets in zip((first, second), buckets):
        assert in_buckets == pytest.approx(final["goodput/wall_s"], rel=1e-9)
        assert final["goodput/startup_s"] > 0 and final["goodput/train_s"] > 0
        assert final["goodput/checkpoint_s"] > 0 and final["goodput/data_s"] > 0
    # the crash came after step 6's metrics; the resume from checkpoint 4 redid 5 and 6
    assert first["step"] == CRASH - 1 and first["goodput/lost_s"] == 0.0
    assert first["goodput/profile_s"] > 0 and first["goodput/eval_s"] < 0.01
    assert second["step"] == STEPS and second["goodput/lost_s"] > 0
    assert second["goodput/eval_s"] > 0 and second["goodput/profile_s"] < 0.01
    losses = [r["step"] for r in records if "loss" in r]
    assert losses == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10]
    memory = [r for r in records if "loss" in r][-1]
    assert 0.1 < memory["host_rss_gib"] < 64

    total = goodput.summarize(records)
    assert total["starts"] == 2
    assert total["lost"] == second["goodput/lost_s"]
    assert total["total"] == pytest.approx(
        sum(walls) + total["between_starts"], rel=0.01, abs=OUTSIDE_CLOCKS_S
    )
    assert total["goodput"] == pytest.approx(
        (first["goodput/train_s"] + second["goodput/train_s"]) / total["total"]
    )


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


_CACHE_PROBE = """
import sys
from jax import monitoring
hits = []
monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
from lmjax import cli
from lmjax.tools import bench
from lmjax.train import compile_cache
with compile_cache.enabled(sys.argv[1]):
    bench.bench_step(cli.load_experiment("smoke", ["mesh.fsdp=2"]), steps=1)
print("cache hits:", len(hits))
"""


@pytest.mark.slow
def test_second_compile_in_a_fresh_process_hits_the_cache(tmp_path):
    env = {
        **os.environ,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
    }
    hits = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _CACHE_PROBE, str(tmp_path / "cache")],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        hits.append(int(out.stdout.split("cache hits:")[1]))
    assert hits[0] == 0 and hits[1] >= 2, hits  # the init and the train step, at least
    assert len(list((tmp_path / "cache").iterdir())) >= 2
