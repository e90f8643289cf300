"""`lmjax smoke` end to end on the CPU: real data, training, checkpoint resume, evaluation, generation."""

from lmjax import cli


def test_smoke_passes_and_a_wrong_platform_fails_its_check(tmp_path, capsys):
    code = cli.main(
        ["smoke", "--steps", "6", "--workdir", str(tmp_path), "--expect-platform", "tpu"]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    assert "[FAIL] devices" in out and "lmjax[tpu]" in out
    for name in ("loss falls", "resume is exact", "evaluates", "generates"):
        assert f"[PASS] {name}" in out, out
    assert "[N/A] attention kernel: not applicable: cpu runs XLA attention" in out, out
    assert "bitwise equal" in out and "tokens/s" in out and "1 check(s) FAILED" in out
