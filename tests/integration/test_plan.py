"""`lmjax plan`: candidate enumeration, the roofline arithmetic, HLO collective parsing, and
(slow) real ahead-of-time TPU compiles in worker processes."""

import json

import jax
import pytest

from lmjax import hardware
from lmjax.commands.experiment import load_experiment
from lmjax.config import ConfigError
from lmjax.tools import aot
from lmjax.tools.plan import search
from tests import tpu_compiler

SMOKE = ["data.seq_len=128"]


def test_plan_on_v5p_8_ranks_like_lmjax_compile_and_reports_failures():
    tpu_compiler.require()
    config = load_experiment("smoke", SMOKE)
    request = search.Request(
        "v5p-8",
        sweeps=(
            "rows_per_chip=1,4",
            "mesh.tensor=1,2",
            "model.remat=full",
            "model.attention=splash,bogus",
        ),
        workers=2,
        timeout=600,
    )
    with pytest.raises(ConfigError, match="model.attention='bogus'"):
        search.plan(config, request, progress=lambda *a: None)
    request = search.Request(
        "v5p-8",
        sweeps=(
            "rows_per_chip=1,4",
            "mesh.tensor=1,3",
            "model.remat=full",
            "model.attention=splash,cudnn",
        ),
        workers=2,
        timeout=600,
    )
    result, text = search.plan(config, request, progress=lambda *a: None)
    json.dumps(result)  # JSON-able
    cands = result["candidates"]
    ok = [c for c in cands if c["status"] == "ok"]
    assert len(ok) == 2 and all("model.attention=splash" in c["overrides"] for c in ok)
    # the cuDNN kernel cannot compile here (f32, packed, no GPU): reported, not fatal
    failed = [c for c in cands if c["status"] == "error"]
    assert len(failed) == 2 and all("cudnn" in c["reason"].lower() for c in failed)
    # tensor=3 does not divide the 4 chips: rejected before compiling, with the reason
    rejected = [c for c in cands if c["status"] == "rejected"]
    assert len(rejected) == 4 and all("does not divide 4 chips" in c["reason"] for c in rejected)
    # memory per chip of each candidate equals what `lmjax compile` reports for its --set line
    # (at jax's default matmul precision, as in a fresh process; conftest raises it)
    for c in ok:
        cfg = load_experiment("smoke", SMOKE + c["overrides"])
        with jax.default_matmul_precision("default"):
            report = aot.compile_train_step(cfg, hardware.parse_target("v5p-8"))
        assert c["memory"]["total_bytes"] == report.total_bytes
    by_rows = sorted(ok, key=lambda c: c["memory"]["total_bytes"])
    assert "data.batch_size=4" in by_rows[0]["overrides"]  # 1 row per chip needs less memory
    assert [c["rank"] for c in ok] == [1, 2] and all(c["fits"] for c in ok)
    assert (
        ok[0]["estimate"]["tokens_per_second_per_chip"]
        >= ok[1]["estimate"]["tokens_per_second_per_chip"]
    )
    assert "best: --set mesh.data=1" in text and "not estimated:" in text
