"""`scripts/device_check.sh --dry-run` on the CPU: every command of the GPU check runs, at tiny
sizes (doctor, `lmjax smoke` end to end, the kernel comparison in the Pallas interpreter, both
benchmarks), into one report that names what was skipped for want of a GPU.

Its smoke step is `lmjax smoke --expect-platform gpu` with 6 steps: here the devices check
must fail and every other check pass, which is what the former test_smoke.py checked; its
bench_512 step is a two-value sweep, which test_cli.py's bench test ran before.
"""

import subprocess
import sys

from tests.helpers import REPO, clean_env

SCRIPT = REPO / "scripts" / "device_check.sh"


def _section(report: str, title: str) -> str:
    return report.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_dry_run_runs_every_command_and_names_what_needs_a_gpu(tmp_path):
    env = clean_env()
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a plain CPU machine
    argv = ["bash", str(SCRIPT), "--dry-run", "--venv", sys.prefix, "--workdir", str(tmp_path)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
    report = (tmp_path / "device_check_report.md").read_text()
    assert done.returncode == 0, report
    assert "DRY RUN (no GPU)" in report

    doctor = _section(report, "lmjax doctor")
    assert "[FAIL] devices: 1 local of 1 x cpu (cpu)" in doctor and "expected gpu" in doctor
    assert "[PASS] processes" in doctor and "1 check(s) FAILED" in doctor
    smoke = _section(report, "lmjax smoke")
    assert "[FAIL] devices" in smoke and "lmjax[gpu]" in smoke
    assert "[N/A] attention kernel: not applicable: cpu runs XLA attention" in smoke
    assert "[N/A] prefill kernel: not applicable: cpu runs XLA attention" in smoke
    for name in ("loss falls", "resume is exact", "evaluates", "generates"):
        assert f"[PASS] {name}" in smoke, smoke
    assert "bitwise equal" in smoke and "tokens/s" in smoke and "1 check(s) FAILED" in smoke
    for step in (doctor, smoke):
        assert "(dry run: only the devices check failed, as it must without a GPU)" in step

    kernels = _section(report, "attention kernels vs XLA")
    assert "Pallas interpreter" in kernels and "| d64 float32 causal |" in kernels
    assert "| PASS |" in kernels and "all cases within tolerance" in kernels
    for bench in ("bench_512", "llama_1b"):
        table = _section(report, f"lmjax bench {bench} bfloat16")
        assert "exit 0" in table and "MFU peak for bfloat16:" in table, table
        assert "tokens/s" in table and "MFU" in table
    sweep = _section(report, "lmjax bench bench_512 bfloat16")
    assert "\nmodel.remat=save_dots " in sweep and "\nmodel.remat=full " in sweep
    summary = _section(report, "Summary")
    for skipped in ("nvidia-smi", "attention kernels compiled on the GPU", "benchmarks at full"):
        assert f"- skipped: {skipped}" in summary
    assert "every step that ran passed" in summary and "FAILED" not in summary
