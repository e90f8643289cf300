"""`lmjax plan`: candidate enumeration, the roofline arithmetic, HLO collective parsing, and
(slow) real ahead-of-time TPU compiles in worker processes."""

import dataclasses
import math

import pytest

from lmjax import hardware
from lmjax.commands.experiment import load_experiment
from lmjax.config import ConfigError
from lmjax.model import flops, transformer
from lmjax.tools import aot, hlo, roofline
from lmjax.tools.plan import budget, candidates, rank, workers
from tests.configs import SPLITTABLE

GiB = 1024**3


def _space(**dims):
    space = dict(candidates.DEFAULT_SPACE)
    space.update({k.replace("__", "."): tuple(map(str, v)) for k, v in dims.items()})
    return space


def test_enumeration_respects_divisibility_and_the_mesh_size():
    config = load_experiment("smoke")  # 4 heads / 2 KV heads, d_model 64, d_mlp 192
    found, rejected = candidates.enumerate_candidates(
        config,
        8,
        2,
        _space(
            mesh__tensor=(1, 2, 3, 4),
            mesh__data=(1, 2),
            mesh__dcn_data=(1, 2),
            rows_per_chip=(1,),
            model__remat=("full",),
            optim__grad_accum=(1, 2, 16),
        ),
    )
    assert found and rejected
    for c in found:
        m = c.config.mesh
        assert m.data * m.fsdp * m.tensor == 8 and m.dcn_data * m.dcn_fsdp == 2
        assert (
            config.model.n_kv_heads % m.tensor == 0
            and config.model.d_model % (m.fsdp * m.dcn_fsdp) == 0
        )
        assert c.config.data.batch_size == 16  # 1 row per chip, 16 chips
        shards = m.data * m.fsdp * m.dcn_data * m.dcn_fsdp
        assert (c.config.data.batch_size // c.config.optim.grad_accum) % shards == 0
        assert "data.batch_size=16" in c.overrides
    reasons = {r.reason for r in rejected}
    assert "mesh.data x mesh.tensor = 1 x 3 does not divide 8 chips per slice" in reasons
    assert (
        "params/layers/wk dimension 'kv_heads' of size 2 is not divisible by mesh axes "
        "tensor of size 4"
    ) in reasons
    # 16 rows in 16 microbatches of 1 row: no batch shards
    assert any(
        r.startswith(
            "batch dimension 'act_batch' of size 1 is not divisible by mesh axes "
            "data+fsdp+expert of size"
        )
        for r in reasons
    )
    # the rules decide: with KV heads replicated, tensor=4 fits 2 KV heads
    replicated = dataclasses.replace(
        config, mesh=dataclasses.replace(config.mesh, rules=("kv_heads=", "act_kv_heads="))
    )
    ok, _ = candidates.enumerate_candidates(
        replicated, 8, 1, _space(mesh__tensor=(4,), rows_per_chip=(1,), model__remat=("full",))
    )
    assert [c.config.mesh.tensor for c in ok] == [4]
    # every point of the space is accounted for
    assert len(found) + len(rejected) == 4 * 2 * 2 * 3


def test_expert_axis_candidates_split_the_experts_or_are_rejected():
    config = load_experiment("moe_small")  # d_model 64, 4 heads / 2 KV heads
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, moe_experts=6))
    space = _space(mesh__expert=(1, 2, 4), mesh__tensor=(1,), rows_per_chip=(1,))
    found, rejected = candidates.enumerate_candidates(config, 8, 1, space)
    by_expert = {c.config.mesh.expert: c for c in found}
    assert "mesh.expert=2" in by_expert[2].overrides and by_expert[2].config.mesh.fsdp == 4
    assert "mesh.expert=1" not in by_expert[1].overrides  # the default stays implicit
    assert set(by_expert) == {1, 2}
    assert (
        "params/moe/w_down dimension 'expert' of size 6 is not divisible by mesh axes expert "
        "of size 4"
    ) in {r.reason for r in rejected}


def test_sweeps_replace_dimensions_and_bad_values_are_config_errors():
    space = candidates.parse_sweeps(["model.remat=none,full", "mesh.tensor=4"])
    assert space["model.remat"] == ("none", "full") and space["mesh.tensor"] == ("4",)
    assert space["rows_per_chip"] == candidates.DEFAULT_SPACE["rows_per_chip"]
    config = load_experiment("smoke")
    with pytest.raises(ConfigError, match="model.remat='fast'"):
        candidates.enumerate_candidates(config, 4, 1, _space(model__remat=("fast",)))
    with pytest.raises(ConfigError, match="non-integer"):
        candidates.enumerate_candidates(config, 4, 1, _space(rows_per_chip=("two",)))
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        candidates.parse_sweeps(["mesh.tensor"])


def test_remat_recompute_flops_worked_by_hand():
    # SPLITTABLE's q, k, v, o: 64 x 16 x (4 + 2 + 2 + 4) = 12288; MLP 3 x 64 x 192 = 36864;
    # attention at seq 128: 2 x 4 x 16 x 128 = 16384 per token per layer.
    recompute = lambda remat: flops.remat_recompute_flops_per_token(
        dataclasses.replace(SPLITTABLE, remat=remat), 128
    )
    assert recompute("none") == 0
    assert recompute("full") == 2 * (2 * (12288 + 36864) + 16384)
    assert recompute("save_dots") == 2 * 16384
    assert recompute("save_attn") == 2 * (2 * (64 * 16 * 4 + 36864) + 16384)


def test_roofline_estimate_worked_by_hand():
    hw = roofline.Hardware(
        peak_flops=100e12,
        hbm_bytes_per_s=1e12,
        ici_bytes_per_s=400e9,
        dcn_bytes_per_s=5e9,
        overlapped=True,
    )
    # compute (600 + 200) TFLOP / 100 TFLOP/s = 8 s; memory 2 TB / 1 TB/s = 2 s;
    # ICI 1.6 TB / 200 GB/s (one direction) = 8 s; DCN 10 GB / 5 GB/s = 2 s added.
    e = roofline.estimate(
        hw,
        model_flops=600e12,
        recompute_flops=200e12,
        traffic_bytes=2e12,
        ici_bytes=1.6e12,
        dcn_bytes=10e9,
        tokens=50_000,
    )
    assert (e.compute_s, e.memory_s, e.ici_s, e.dcn_s) == pytest.approx((8, 2, 8, 2))
    assert e.step_s == pytest.approx(10) and e.bound in ("compute", "ici")
    assert e.mfu == pytest.approx(600e12 / (10 * 100e12))
    assert e.tokens_per_s_per_chip == pytest.approx(5000)
    serial = roofline.estimate(
        roofline.Hardware(100e12, 1e12, 400e9, 5e9, overlapped=False),
        model_flops=600e12,
        recompute_flops=200e12,
        traffic_bytes=2e12,
        ici_bytes=1.6e12,
        dcn_bytes=10e9,
        tokens=50_000,
    )
    assert serial.step_s == pytest.approx(8 + 2 + 8 + 2)
    assert roofline.traffic_bytes(argument=10, output=4, temp=3) == 20


def test_ring_bytes():
    assert hlo.ring_bytes("all-gather", 800, 8) == 700
    assert hlo.ring_bytes("reduce-scatter", 100, 8) == 700
    assert hlo.ring_bytes("all-reduce", 800, 8) == 1400
    assert hlo.ring_bytes("all-reduce", 800, 1) == 0


HLO = """\
%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %constant.1 = s32[] constant(1)
  %constant.7 = s32[]{:T(128)} constant(32)
  %gte = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%gte, %constant.7), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[4,1024]{1,0} all-gather(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}
  %ar = f32[256]{0} all-reduce(%y), channel_id=2, replica_groups=mesh['data'=2,'fsdp'=4] {'data'}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %z)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %rs = f32[16]{0} reduce-scatter(%g), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  ROOT %out = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_hlo_collectives_count_loop_bodies_per_iteration_and_find_dcn():
    # devices 0-3 on slice 0, 4-7 on slice 1
    found = {c.kind: c for c in hlo.collectives(HLO, [0, 0, 0, 0, 1, 1, 1, 1])}
    ag, ar, rs = found["all-gather"], found["all-reduce"], found["reduce-scatter"]
    assert (ag.result_bytes, ag.group_size, ag.executions, ag.crosses_slices) == (
        8192,
        4,
        32,
        False,
    )
    # mesh [data=2, fsdp=4], groups along data: {0,4},{1,5},... -> across the two slices
    assert (ar.result_bytes, ar.group_size, ar.executions, ar.crosses_slices) == (1024, 2, 32, True)
    assert (rs.result_bytes, rs.group_size, rs.executions, rs.crosses_slices) == (64, 8, 1, True)
    assert ag.bytes_sent == 32 * 8192 * 3 / 4


@pytest.mark.parametrize(
    "line, groups",
    [
        ("replica_groups={{0,2},{1,3}}, x", [[0, 2], [1, 3]]),
        ("replica_groups=[2,2]<=[4], x", [[0, 1], [2, 3]]),
        ("replica_groups=[2,2]<=[2,2]T(1,0), x", [[0, 2], [1, 3]]),
        ("replica_groups=mesh['a'=2,'b'=2] {'a'}, x", [[0, 2], [1, 3]]),
        ("replica_groups=mesh['a'=2,'b'=2] {'a','b'}, x", [[0, 1, 2, 3]]),
        ("replica_groups={}, x", [[0, 1, 2, 3]]),
    ],
)
def test_replica_group_spellings(line, groups):
    assert hlo.replica_groups(line, 4) == groups


def test_run_length_and_compute_optimal_budget():
    run = budget.run_length(2.0, 1_000_000, 32, tokens=1e9)
    assert run["steps"] == 1000 and run["wall_seconds"] == 2000
    assert run["chip_hours"] == pytest.approx(2000 / 3600 * 32)
    assert budget.run_length(2.0, 10, 4, days=1)["steps"] == 43200
    # 1e6 chip-hours x 3600 s x 100 TFLOP/s x 50% = 1.8e23 FLOPs = 6 N (20 N)
    n, d = budget.compute_optimal(1e6, 100e12, 0.5)
    assert 6 * n * d == pytest.approx(1.8e23) and d == pytest.approx(20 * n)
    shape = budget.derived_shape(8e9, 128256)
    assert (
        3072 <= shape["model.d_model"] <= 5120
        and shape["model.n_heads"] * 128 == shape["model.d_model"]
    )
    presets = {
        "llama3_8b": load_experiment("llama3_8b").model,
        "llama_125m": load_experiment("llama_125m").model,
    }
    proposal = budget.budget_proposal(1e6, 100e12, 0.5, presets, 128256)
    assert proposal["preset"] == "llama3_8b"
    assert proposal["preset_tokens"] == pytest.approx(1.8e23 / (6 * proposal["preset_params"]))


def test_one_table_serves_compile_and_the_launchers():
    target = hardware.parse_target("v5p-64")
    shape = hardware.slice_shape("v5p-64")
    assert target.generation is shape.generation is hardware.GENERATIONS["v5p"]
    assert target.topology == f"v5p:{shape.topology}" and target.chips == shape.chips
    assert hardware.parse_target("v5e-16").generation is hardware.GENERATIONS["v5litepod"]
    for gen in hardware.GENERATIONS.values():
        assert gen.peak_flops > 1e14 and gen.hbm_bytes_per_s > 5e11
        assert gen.ici_bytes_per_s > gen.dcn_bytes_per_s > 0


def test_plan_json_schema_is_stable():
    """The keys scripts read, from a plan whose compiles are stubbed by outcomes."""
    config = load_experiment("smoke")
    (cand,), _ = candidates.enumerate_candidates(
        config, 4, 1, _space(mesh__tensor=(1,), rows_per_chip=(1,), model__remat=("full",))
    )
    report = aot.CompileReport(
        None,
        1,
        {"data": 1, "fsdp": 4, "tensor": 1},
        16 * GiB,
        1000,
        200,
        200,
        300,
        1.5,
        1.5,
        1e9,
        float("nan"),
        4e9,
        256,
        {},
        1e6,
        0.0,
    )
    failed = workers.Outcome(cand, "error", "RuntimeError: boom")
    rows = rank.rank(
        [workers.Outcome(cand, "ok", report=report), failed],
        rank.tpu_hardware(hardware.GENERATIONS["v5p"]),
    )
    result = rank.to_json(
        rows,
        [candidates.Rejected(("mesh.tensor=3",), "why")],
        target={"accelerator": "v5p-8"},
        hw=rank.tpu_hardware(hardware.GENERATIONS["v5p"]),
        run=None,
        budget=None,
    )
    assert result["schema"] == "lmjax.tools.plan/1"
    assert set(result) == {"schema", "target", "hardware", "candidates", "run", "budget"}
    keys = {
        "rank",
        "overrides",
        "status",
        "reason",
        "fits",
        "memory",
        "compile_seconds",
        "estimate",
        "measured_step_seconds",
    }
    assert all(set(c) == keys for c in result["candidates"])
    first, second, third = result["candidates"]
    assert set(first["memory"]) == {
        "total_bytes",
        "hbm_bytes",
        "headroom_bytes",
        "argument_bytes",
        "output_bytes",
        "alias_bytes",
        "temp_bytes",
    }
    assert set(first["estimate"]) == {
        "step_seconds",
        "compute_seconds",
        "memory_seconds",
        "ici_seconds",
        "dcn_seconds",
        "bound",
        "mfu",
        "tokens_per_second_per_chip",
        "xla_step_seconds",
    }
    assert first["memory"]["total_bytes"] == 1000 + 200 - 200 + 300 and first["fits"]
    assert (second["status"], second["reason"], second["estimate"]) == (
        "error",
        "RuntimeError: boom",
        None,
    )
    assert (third["status"], third["rank"]) == ("rejected", None)
    assert math.isfinite(first["estimate"]["step_seconds"])


def test_a_candidate_that_times_out_is_killed_and_reported():
    config = load_experiment("smoke")
    cands, _ = candidates.enumerate_candidates(
        config, 4, 1, _space(mesh__tensor=(1,), rows_per_chip=(1,), model__remat=("full", "none"))
    )
    seen = []
    outcomes = workers.compile_all(
        cands, "v5p-8", 1, workers=2, timeout=0.5, progress=lambda *a: seen.append(a)
    )
    assert [o.status for o in outcomes] == ["timeout", "timeout"]
    assert "--timeout=0.5 s" in outcomes[0].reason
    assert seen[-1] == (2, 2, 2)


def test_mixtral_plan_on_v6e_256_counts_two_of_eight_experts():
    """Mixtral 8x7B at MaxText's recipe shapes (v6e-256, 12 x 4096 per chip, full remat): the
    candidates with and without an expert axis, and the plan's FLOPs, worked by hand."""
    config = load_experiment("mixtral_8x7b")  # seq 4096
    m = config.model
    # Per layer: attention 4096 x 128 x (32 + 8 + 8 + 32) = 41,943,040; 2 norms 8,192; router
    # 4096 x 8 = 32,768; experts 8 x 3 x 4096 x 14336 = 1,409,286,144 (2 of 8 active:
    # 352,321,536). Embedding and head 2 x 32000 x 4096 = 262,144,000; final norm 4,096.
    layer_total = 41_943_040 + 8_192 + 32_768 + 1_409_286_144
    layer_active = 41_943_040 + 8_192 + 32_768 + 352_321_536
    assert transformer.count_params(m) == 32 * layer_total + 262_148_096 == 46_702_792_704
    active = transformer.count_params(m, active=True)
    assert active == 32 * layer_active + 262_148_096 == 12_879_925_248
    # 6 x active parameters less the input embedding, plus attention: 12 x 32 heads x 128 x
    # 2048 keys on average (causal, seq 4096) x 32 layers.
    per_token = 6 * (active - 131_072_000) + 12 * 32 * 128 * 2048 * 32
    assert flops.flops_per_token(m, 4096) == per_token
    # Full remat recomputes each layer's forward: 2 x (q/k/v/o 41,943,040 + 2 experts and the
    # router 4096 x (6 x 14336 + 8)) per layer, and the attention core 4 x 32 x 128 x 2048 x 32.
    recompute = 32 * 2 * (41_943_040 + 4096 * (6 * 14336 + 8)) + 4 * 32 * 128 * 2048 * 32
    assert flops.remat_recompute_flops_per_token(m, 4096) == recompute

    space = _space(
        mesh__expert=(1, 8, 16), mesh__tensor=(1,), rows_per_chip=(12,), model__remat=("full",)
    )
    found, rejected = candidates.enumerate_candidates(config, 256, 1, space)
    assert [(c.config.mesh.fsdp, c.config.mesh.expert) for c in found] == [(256, 1), (32, 8)]
    assert all(c.config.data.batch_size == 3072 for c in found)
    assert [r.reason for r in rejected] == [
        "params/moe/w_down dimension 'expert' of size 8 is not divisible by mesh axes expert "
        "of size 16"
    ]

    # The estimate of the expert-parallel candidate from a stubbed compile of 29 GiB: compute
    # is (model + recomputed) FLOPs per chip over v6e's peak, MFU the model FLOPs' share.
    cand = found[1]
    tokens = 12 * 4096
    v6e = hardware.GENERATIONS["v6e"]
    report = aot.CompileReport(
        target=hardware.parse_target("v6e-256"),
        num_slices=1,
        mesh_shape={"data": 1, "fsdp": 32, "expert": 8, "tensor": 1},
        hbm_bytes=v6e.hbm_bytes,
        argument_bytes=2 * GiB,
        output_bytes=2 * GiB,
        alias_bytes=2 * GiB,
        temp_bytes=27 * GiB,
        compile_seconds=200.0,
        compile_cpu_seconds=200.0,
        xla_flops=float("nan"),
        xla_optimal_seconds=float("nan"),
        model_flops=per_token * tokens,
        tokens_per_step=3072 * 4096,
        pallas_kernels={},
        ici_bytes=0.0,
        dcn_bytes=0.0,
    )
    hw = rank.tpu_hardware(v6e)
    (row,) = rank.rank([workers.Outcome(cand, "ok", report=report)], hw)
    assert row.estimated.compute_s == pytest.approx(
        (per_token + recompute) * tokens / v6e.peak_flops
    )
    assert row.estimated.mfu == pytest.approx(per_token / (per_token + recompute))
    table = rank.format_table([row], [])
    assert table.splitlines()[0].split()[1] == "data/fsdp/expert/tensor"
    assert table.splitlines()[1].split()[1] == "1/32/8/1"
