"""lmjax installed as a user installs it (a wheel, not the checkout) runs its presets on its
packaged corpus from any directory: what `launch/tpu.py run` does on a TPU VM, and what the
checked-in SLURM script does with an installed environment (`LMJAX_VENV`)."""

import os
import shutil
import subprocess
import sys

from tests.helpers import REPO


def test_a_wheel_installed_elsewhere_trains_the_smoke_preset_from_another_directory(tmp_path):
    source, wheels, target, elsewhere = (
        tmp_path / d for d in ("source", "wheels", "site", "elsewhere")
    )
    # Built from a copy of what a wheel is made of: setuptools builds in the source tree, and
    # a checkout's stale build/ or untracked files must not leak into the wheel.
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "lmjax", source / "lmjax", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("lmjax-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    elsewhere.mkdir()
    # Only the installed copy is importable: not the checkout, not the editable install.
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import lmjax, lmjax.commands.experiment as e; print(lmjax.__file__, e.experiment_names())",
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(target)), where
    for preset in ("smoke", "quickstart", "llama3_8b", "llama3_70b"):
        assert f"'{preset}'" in where
    # The training runs as SLURM runs it: launch/slurm.sbatch activates the environment
    # (LMJAX_VENV: here one whose activate script puts the wheel's console script on PATH) and
    # hands the command to srun (here one that drops its flags and runs the single task).
    venv, fake_bin = tmp_path / "venv", tmp_path / "fake-bin"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(
        f'export PATH="{target}/bin:$PATH" PYTHONPATH="{target}"\n'
    )
    fake_bin.mkdir()
    (fake_bin / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')
    (fake_bin / "srun").chmod(0o755)
    settings = ["run.steps=2", "checkpoint.every_steps=2", "run.eval_batches=1"]
    out = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "lmjax", "train", "--experiment", "smoke"]
        + ["--workdir", "w"]
        + [arg for s in [*settings, "run.compile_cache_dir="] for arg in ("--set", s)],
        cwd=elsewhere,
        env={**env, "LMJAX_VENV": str(venv), "PATH": f"{fake_bin}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "eval_loss=" in out.stdout
    assert (elsewhere / "w" / "checkpoints" / "2").is_dir()
    assert (elsewhere / "w" / "tokenizer.model").exists()  # trained on the packaged corpus
