"""The user-facing commands on one real smoke run: eval, generate, checkpoint, convert, bench."""

import json
import os
import shutil

import pytest

from lmjax import cli
from lmjax.config import ConfigError
from lmjax.observe import metrics


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 6-step smoke run; every command of this module gets its workdir as a relative path,
    as a user typing `--workdir runs/x` would."""
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cli"))
    try:
        assert (
            cli.main(
                [
                    "train",
                    "--experiment",
                    "smoke",
                    "--workdir",
                    "run",
                    "--set",
                    "run.steps=6",
                    "--set",
                    "checkpoint.every_steps=3",
                ]
            )
            == 0
        )
        yield "run"
    finally:
        os.chdir(cwd)


def test_eval_on_text_files_and_on_experiment_data(run_dir, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("ROMEO: But soft, what light through yonder window breaks?\n")
    assert cli.main(["eval", "--workdir", run_dir, "--text-files", str(text), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bytes"] == len(text.read_text().encode()) and result["tokens"] > 0
    assert 0 < result["bits_per_byte"] < 20
    assert (
        cli.main(["eval", "--workdir", run_dir, "--experiment-data", "--step", "3", "--json"]) == 0
    )
    at_3 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(["eval", "--workdir", run_dir, "--experiment-data", "--json"]) == 0
    at_6 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert at_6["loss"] < at_3["loss"]


def test_eval_rejects_a_glob_matching_nothing(run_dir, capsys):
    assert cli.main(["eval", "--workdir", run_dir, "--text-files", "/nonexistent/*.txt"]) == 2
    assert "matched no files" in capsys.readouterr().err


def test_checkpoint_list_export_and_hf_round_trip(run_dir, tmp_path, capsys):
    assert cli.main(["checkpoint", "list", run_dir, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [3, 6] and all(r["complete"] for r in rows)
    exported, hf_dir, back = "export", "hf", "back"  # relative, like the workdir
    assert (
        cli.main(["checkpoint", "export", run_dir, "--step", "6", "--params-only", exported]) == 0
    )
    assert cli.main(["convert", "to-hf", exported, hf_dir]) == 0
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors"))
    assert cli.main(["convert", "from-hf", hf_dir, back]) == 0
    capsys.readouterr()
    fresh = "finetune"
    assert (
        cli.main(
            [
                "train",
                "--experiment",
                "smoke",
                "--workdir",
                fresh,
                "--init-from",
                back,
                "--set",
                "run.steps=1",
                "--set",
                "optim.lr=0",
            ]
        )
        == 0
    )
    first = [r for r in metrics.read_records(fresh) if "loss" in r][0]
    final_eval = [r for r in metrics.read_records(run_dir) if "eval_loss" in r][-1]
    # lr 0: the imported params are the trained ones, so eval matches the source run's.
    fresh_eval = [r for r in metrics.read_records(fresh) if "eval_loss" in r][-1]
    assert fresh_eval["eval_loss"] == pytest.approx(final_eval["eval_loss"], rel=1e-5)
    assert first["loss"] < 6.0


def test_bench_generate_table(capsys):
    assert (
        cli.main(
            [
                "bench",
                "generate",
                "--experiment",
                "smoke",
                "--batch",
                "2",
                "--prompt-len",
                "8",
                "--new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert "decode" in capsys.readouterr().out
    # `lmjax bench` of the train step, with a sweep: tests/integration/test_device_check.py


def test_bad_values_stop_before_any_work_in_one_line(run_dir, tmp_path, capsys):
    """Config mistakes, every parameter's sharding on the mesh, the mesh's batch split, a
    missing --init-from and the tokenizer's vocabulary are all checked before a tokenizer is
    trained, a store prepared or anything compiles: exit 2, one line, nothing written."""
    cases = [
        (["--set", "run.eval_every=-1"], "run.eval_every=-1 must be 0"),
        (["--set", "checkpoint.every_steps=0"], "checkpoint.every_steps=0"),
        (["--set", "data.batch_size=6"], "data.batch_size=6 is not divisible by the 8"),
        (["--set", "mesh.rules=embed=tensor", "--set", "mesh.tensor=2"], "rule conflict"),
        (["--set", "mesh.tensor=4"], "'kv_heads' of size 2"),
        (["--set", "data.validation_fraction=0"], "data.validation_fraction=0 holds out no"),
        (["--set", "data.source=synthetic", "--set", "data.seed=-1"], "data.seed=-1 must not"),
        (["--init-from", str(tmp_path / "none")], "is not an lmjax params directory"),
        (
            ["--set", f"data.tokenizer={run_dir}/tokenizer.model", "--set", "model.vocab_size=300"],
            "has 512 ids but model.vocab_size=300",
        ),
    ]
    for i, (extra, fragment) in enumerate(cases):
        work = tmp_path / f"w{i}"
        assert cli.main(["train", "--experiment", "smoke", "--workdir", str(work), *extra]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
        written = {p.name for p in work.iterdir()} if work.exists() else set()
        assert written <= {"lease"}, (extra, written)  # no tokenizer, store, config
    # a resume that would change the data position: refused from the checkpoint's metadata,
    # before the restore, and config.json still describes the checkpoints
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed, ignore=shutil.ignore_patterns("tensorboard"))
    before = (resumed / "config.json").read_text()
    argv = ["train", "--experiment", "smoke", "--workdir", str(resumed), "--set", "run.steps=8"]
    assert cli.main([*argv, "--set", "data.seq_len=32"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len: checkpoint 64, now 32" in err and "resumed from" not in err, err
    assert (resumed / "config.json").read_text() == before
    with pytest.raises(ConfigError):  # -v shows the traceback
        cli.main(
            [
                "-v",
                "train",
                "--experiment",
                "smoke",
                "--workdir",
                str(tmp_path / "v"),
                "--set",
                "run.eval_batches=0",
            ]
        )


def test_non_utf8_input_names_the_file(run_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    assert cli.main(["eval", "--workdir", run_dir, "--text-files", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not UTF-8 text (byte 3" in err
    assert cli.main(["generate", "--workdir", run_dir, "--prompts-file", str(bad)]) == 2
    assert f"{bad} is not UTF-8" in capsys.readouterr().err


def test_internal_errors_are_not_dressed_as_user_mistakes(run_dir, monkeypatch):
    from lmjax.checkpoint import listing

    for error in (ValueError("an internal inconsistency"), FileNotFoundError("an internal file")):

        def broken(workdir, error=error):
            raise error

        monkeypatch.setattr(listing, "list_checkpoints", broken)
        with pytest.raises(type(error), match="internal"):  # the traceback is kept
            cli.main(["checkpoint", "list", run_dir])
