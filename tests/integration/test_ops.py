"""Operations: goodput accounting over a crash and a resume, the profile trace's named
scopes, and the persistent compilation cache in fresh processes.

One run of the smoke experiment (packaged corpus, real tf.data and orbax) crashes at step 7
(a hook raises, after checkpoint 4) while tracing steps 2-3; a second call resumes it from
step 4, redoing steps 5 and 6.
"""

import os
import subprocess
import sys

import pytest

from lmjax.observe import goodput, metrics
from tests.helpers import REPO
from tests.unit import test_ops as fast_tier
from tests.unit.test_ops import CRASH, STEPS

# The fast tier's module-scoped fixture these tests share (pytest finds a fixture by the
# module attribute that holds it).
crashed_and_resumed = fast_tier.crashed_and_resumed

# Seconds of the two starts that fall outside every goodput clock: 0.09 s measured on the
# 2-core CI machine, so 0.5 s leaves room under load and still fails if the clock started
# after start-up and compilation (over 7 s here) or stopped before the last save.
OUTSIDE_CLOCKS_S = 0.5


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


_CACHE_PROBE = """
import sys
from jax import monitoring
hits = []
monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
from lmjax.commands.experiment import load_experiment
from lmjax.tools import bench
from lmjax.train import compile_cache
with compile_cache.enabled(sys.argv[1]):
    bench.bench_step(load_experiment("smoke", ["mesh.fsdp=2"]), steps=1)
print("cache hits:", len(hits))
"""


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
