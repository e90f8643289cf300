"""The gs:// tier: lmjax's commands with every run record, checkpoint, export, HF directory,
report, tokenizer, data store, eval text and compile cache in a bucket of the tests' GCS server
(tests/conftest.py's gcs_server), and only STORAGE_EMULATOR_HOST set, as a user on a Cloud TPU
VM would run them.

One uninterrupted run (in process) trains the tokenizer into its gs:// workdir and prepares
the gs:// store; a second run, a `python -m lmjax` subprocess, is SIGKILLed after its first
checkpoint and resumed, and must log the reference's losses bit for bit. Every test checks
that no local folder named `gs:` appeared (a gs:// path that bypassed lmjax.storage).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lmjax import cli, storage
from lmjax.checkpoint import checkpointer, params_dir, paths
from lmjax.data import documents
from lmjax.data.tokenizer import load_tokenizer
from lmjax.observe import metrics
from tests.configs import smoke_train_args
from tests.helpers import REPO

STEPS = 8
# What the test process may have derived from STORAGE_EMULATOR_HOST (lmjax.storage does so in
# process): kept out of the subprocess, which must derive them itself.
DERIVED = ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "EPATH_USE_TF")


@pytest.fixture(scope="module")
def bucket(gcs_server):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
        yield gcs_server.bucket("tier")


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    """The working directory of every command; checked for stray `gs:` folders after each test."""
    path = tmp_path_factory.mktemp("tier")
    previous = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(previous)


@pytest.fixture(autouse=True)
def no_local_gs_folder(cwd):
    yield
    strays = [*cwd.rglob("gs:"), *Path(tempfile.gettempdir()).glob("gs:"), *REPO.glob("gs:")]
    assert not strays, f"a gs:// path was written locally: {strays}"


def _train_args(workdir: str, bucket: str, *extra: str) -> list[str]:
    return [
        "train",
        "--workdir",
        workdir,
        *smoke_train_args(STEPS),
        "--set",
        f"data.store_dir={bucket}/stores",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(bucket, cwd):
    """gs://tier/ref, trained in process: (workdir, {step: loss})."""
    workdir = f"{bucket}/ref"
    assert cli.main(_train_args(workdir, bucket)) == 0
    losses = {r["step"]: r["loss"] for r in metrics.read_records(workdir) if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert storage.glob(f"{bucket}/stores/*/store.json"), "the store is not in the bucket"
    return workdir, losses


def _committed(workdir: str) -> list[int]:
    return checkpointer.steps_in(paths.checkpoint_dir(workdir))


def test_sigkill_and_resume_on_gs_log_the_uninterrupted_losses_bit_for_bit(
    bucket, cwd, reference, gcs_server
):
    ref_dir, ref_losses = reference
    workdir = f"{bucket}/killed"
    cache = f"{bucket}/compile-cache"
    command = [sys.executable, "-m", "lmjax"] + _train_args(
        workdir,
        bucket,
        "--set",
        f"data.tokenizer={ref_dir}/tokenizer.model",
        "--set",
        f"run.compile_cache_dir={cache}",
    )
    env = {k: v for k, v in os.environ.items() if k not in DERIVED}
    env |= {"STORAGE_EMULATOR_HOST": gcs_server.url, "PYTHONPATH": str(REPO)}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache even the tiny model's steps
    with open(cwd / "killed.log", "w") as log:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not _committed(workdir):
            assert proc.poll() is None, (cwd / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = _committed(workdir)
    out = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    records = metrics.read_records(workdir)
    last_start = max(i for i, r in enumerate(records) if r.get("event") == "start")
    restored = records[last_start]["restored_step"]
    assert restored == max(killed_at) < STEPS, (killed_at, restored)
    resumed = {r["step"]: r["loss"] for r in records[last_start:] if "loss" in r}
    assert sorted(resumed) == list(range(restored + 1, STEPS + 1))
    assert resumed == {s: ref_losses[s] for s in resumed}  # floats compared exactly
    assert storage.glob(f"{cache}/*"), "nothing was written to the gs:// compile cache"
    assert storage.glob(f"{workdir}/tensorboard/events.out.tfevents.*")


def test_checkpoint_export_convert_eval_generate_and_report_on_gs(bucket, reference, capsys):
    workdir, _ = reference
    assert cli.main(["checkpoint", "list", workdir, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [4, 8] and all(r["complete"] for r in rows)
    exported, hf_dir = f"{bucket}/export", f"{bucket}/hf"
    assert cli.main(["checkpoint", "export", workdir, "--params-only", exported]) == 0
    assert cli.main(["convert", "to-hf", exported, hf_dir]) == 0
    assert storage.path(f"{hf_dir}/model.safetensors").exists()
    assert cli.main(["convert", "from-hf", hf_dir, f"{bucket}/back"]) == 0  # streamed to gs://
    _, back = params_dir.load(f"{bucket}/back")
    jax.tree.map(np.testing.assert_array_equal, back, params_dir.load(exported)[1])

    texts = f"{bucket}/texts"
    storage.path(f"{texts}/a.txt").write_text("ROMEO: But soft, what light?\n")
    storage.path(f"{texts}/b.txt").write_text("JULIET: O Romeo, Romeo!\n")
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", workdir, "--text-files", f"{texts}/*.txt", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored["bytes"] == len("ROMEO: But soft, what light?\nJULIET: O Romeo, Romeo!\n")
    assert cli.main(["eval", "--workdir", workdir, "--experiment-data", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] > 0
    assert (
        cli.main(["generate", "--workdir", workdir, "--prompt", "To be", "--max-new-tokens", "4"])
        == 0
    )
    assert capsys.readouterr().out.startswith("To be")
    assert cli.main(["report", "--workdir", workdir]) == 0
    assert "goodput" in capsys.readouterr().out
    assert storage.path(f"{workdir}/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(storage.path(f"{workdir}/config.json").read_text())["run"]["steps"] == STEPS


def test_tokenizer_train_from_gs_text_to_gs_equals_training_on_local_files(bucket, cwd, capsys):
    """`lmjax tokenizer train` on gs:// inputs, written to gs://, is the tokenizer that the
    same command trains from local copies of the files (training is seeded)."""
    sonnets = Path(documents.PACKAGED_DIR) / "sonnets.txt"
    storage.path(f"{bucket}/corpus/sonnets.txt").write_text(sonnets.read_text())
    args = ["--vocab-size", "384", "--seed", "1"]
    remote, local = f"{bucket}/tok/sp", str(cwd / "tok" / "sp")
    assert (
        cli.main(
            ["tokenizer", "train", "--input", f"{bucket}/corpus/*.txt", "--output", remote, *args]
        )
        == 0
    )
    assert cli.main(["tokenizer", "train", "--input", str(sonnets), "--output", local, *args]) == 0
    printed = capsys.readouterr().out
    assert f"{remote}.model" in printed
    remote_tok, local_tok = (load_tokenizer(f"{p}.model") for p in (remote, local))
    assert remote_tok.fingerprint == local_tok.fingerprint and remote_tok.vocab_size == 384
