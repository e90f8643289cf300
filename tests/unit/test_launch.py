"""Launchers: local processes for real; TPU/GKE/SLURM through their dry-run commands, with the
remote and container scripts executed by a real bash against fake gcloud-side tools."""

import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from launch import gke, slurm, tpu
from lmjax.hardware import slice_shape
from tests.helpers import REPO

HOSTILE = ["x; rm -rf ~", "$(id)", "`id`", 'it\'s "both"', "a\nb", "*", "~"]


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


WHERE = ["--name", "my-tpu", "--zone", "us-east5-a", "--project", "my-proj"]


def _tpu(*argv):
    return tpu.parse_args(list(argv))


def test_tpu_create_single_slice():
    args = _tpu("create", *WHERE, "--accelerator-type", "v5litepod-16", "--spot")
    assert tpu.commands(args) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "create",
            "my-tpu",
            "--zone=us-east5-a",
            "--project=my-proj",
            "--accelerator-type=v5litepod-16",
            "--version=v2-alpha-tpuv5-lite",
            "--spot",
        ]
    ]
    args = _tpu(
        "create",
        *WHERE,
        "--accelerator-type",
        "v4-32",
        "--preemptible",
        "--runtime-version",
        "tpu-vm-v4-base",
    )
    assert tpu.commands(args)[0][-2:] == ["--version=tpu-vm-v4-base", "--preemptible"]


def test_tpu_create_multi_slice_queued_resource(tmp_path):
    args = _tpu("create", *WHERE, "--accelerator-type", "v5p-64", "--num-slices", "4", "--spot")
    create, wait = tpu.commands(args)
    assert create == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "my-tpu",
        "--zone=us-east5-a",
        "--project=my-proj",
        "--accelerator-type=v5p-64",
        "--runtime-version=v2-alpha-tpuv5",
        "--node-count=4",
        "--node-prefix=my-tpu",
        "--spot",
    ]
    # The wait loop is real bash: run it against a fake gcloud that reports ACTIVE.
    assert wait[:2] == ["bash", "-c"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "gcloud", '#!/bin/sh\necho "$@" >> "$CALLS"\necho ACTIVE\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"))
    assert subprocess.run(wait, env=env, timeout=30).returncode == 0
    assert (tmp_path / "calls").read_text().split() == [
        "compute",
        "tpus",
        "queued-resources",
        "describe",
        "my-tpu",
        "--zone=us-east5-a",
        "--project=my-proj",
        "--format=value(state.state)",
    ]
    single_queued = _tpu("create", *WHERE, "--accelerator-type", "v6e-256", "--queued")
    assert "--node-id=my-tpu" in tpu.commands(single_queued)[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "create",
                "--name",
                "x; rm -rf ~",
                "--zone",
                "z",
                "--project",
                "p",
                "--accelerator-type",
                "v5p-8",
            ],
            "--name 'x; rm -rf ~'",
        ),
        (
            [
                "create",
                "--name",
                "$(id)",
                "--zone",
                "z",
                "--project",
                "p",
                "--accelerator-type",
                "v5p-8",
            ],
            "lowercase letters",
        ),
        (
            [
                "create",
                *WHERE,
                "--accelerator-type",
                "v5p-64",
                "--num-slices",
                "2",
                "--preemptible",
            ],
            "take --spot, not --preemptible",
        ),
        (["create", *WHERE, "--accelerator-type", "v9z-8"], "expected PREFIX-N"),
        (["create", *WHERE], "needs --accelerator-type"),
        (["run", *WHERE], "give the command to run after --"),
        (["install", *WHERE, "--source", "/nonexistent"], "not an lmjax checkout"),
        (["install", *WHERE, "--git", "https://github.com/me/lmjax"], "pin a revision"),
    ],
)
def test_tpu_bad_arguments_fail_before_any_command(argv, message, capsys):
    with pytest.raises(SystemExit):
        tpu.parse_args(argv)
    assert message in capsys.readouterr().err


def _remote_script(ssh_argv):
    """The --command of an ssh argv, as the remote login shell splits it: bash -c SCRIPT."""
    command = ssh_argv[ssh_argv.index("--command") + 1]
    words = shlex.split(command)
    assert words[:2] == ["bash", "-c"] and len(words) == 3
    return words[2]


def test_tpu_run_quotes_hostile_arguments_at_every_level(capsys):
    user_command = ["lmjax", "train", "--set", *HOSTILE]
    args = _tpu("run", *WHERE, "--dry-run", "--", *user_command)
    assert tpu.main(["run", *WHERE, "--dry-run", "--", *user_command]) == 0
    printed = capsys.readouterr().out
    (ssh,) = tpu.commands(args)
    # Local shell level: the printed line splits back into exactly the argv of the command.
    assert shlex.split(printed) == ssh
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert {"--zone=us-east5-a", "--project=my-proj", "--worker=all"} <= set(ssh)
    # Remote levels: one bash -c argument; inside it the user's words come back literally.
    script = _remote_script(ssh)
    for branch in script.split("; then ")[1].split("; else "):
        assert shlex.split(branch)[: len(user_command)] == user_command


def test_tpu_remote_script_runs_literally_in_bash(tmp_path):
    """Execute the worker script with bash: fake metadata (curl) says worker 0, then 1."""
    marker_words = ["x; touch INJECTED", "$(touch INJECTED)", "`touch INJECTED`", *HOSTILE]
    script = _remote_script(
        tpu.commands(_tpu("run", *WHERE, "--", "printf", "<%s>\n", *marker_words))[0]
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for worker in ("0", "1"):
        _executable(bin_dir / "curl", f"#!/bin/sh\necho {worker}\n")
        home = tmp_path / f"home{worker}"
        home.mkdir()
        p = subprocess.run(
            ["bash", "-c", script],
            cwd=home,
            capture_output=True,
            text=True,
            env=dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}"),
            timeout=30,
        )
        assert p.returncode == 0, p.stderr
        expected = "".join(f"<{w}>\n" for w in marker_words)
        assert (home / "lmjax-run.log").read_text() == expected
        assert p.stdout == (expected if worker == "0" else "")  # only worker 0 streams
        assert not list(home.glob("INJECTED*")) and not list(tmp_path.glob("INJECTED*"))
    # The exit code of the command survives the tee pipe.
    failing = _remote_script(tpu.commands(_tpu("run", *WHERE, "--", "sh", "-c", "exit 7"))[0])
    p = subprocess.run(
        ["bash", "-c", failing],
        cwd=tmp_path,
        capture_output=True,
        env=dict(os.environ, HOME=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}"),
        timeout=30,
    )
    assert p.returncode == 7


def test_tpu_multi_slice_run_targets_every_slice():
    args = _tpu("run", *WHERE, "--num-slices", "3", "--", "lmjax", "train")
    cmds = tpu.commands(args)
    assert [c[5] for c in cmds] == ["my-tpu-0", "my-tpu-1", "my-tpu-2"]
    assert all("--worker=all" in c for c in cmds)
    scripts = [_remote_script(c) for c in cmds]
    assert "tee -a" in scripts[0] and not any("tee" in s for s in scripts[1:])
    lines = tpu.dry_run_lines(args)
    assert lines[0] == "# the next 3 commands run at the same time"
    assert [shlex.split(l) for l in lines[1:]] == cmds


def _fake_checkout(root):
    for name in (
        "setup.cfg",
        "lmjax/__init__.py",
        ".git/HEAD",
        "lmjax/__pycache__/m.pyc",
        ".venv/bin/python",
        "runs/r/metrics.jsonl",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    return root


# A stand-in for uv on a worker: records its arguments; `uv venv DIR` makes DIR/bin/lmjax,
# which reports which environment ran it.
_FAKE_UV = """#!/bin/sh
echo "$PWD: $*" >> "$HOME/uv-calls"
if [ "$1" = venv ]; then
  for last; do :; done
  mkdir -p "$last/bin"
  printf '#!/bin/sh\necho "lmjax from %s: $*"\n' "$last" > "$last/bin/lmjax"
  chmod +x "$last/bin/lmjax"
fi
"""


def test_tpu_install_makes_a_python_312_env_from_this_checkout_and_run_uses_it(tmp_path):
    """The worker scripts in a real bash, with uv faked: the default install copies this
    checkout into a uv venv of Python 3.12 (TPU VM images have 3.10); `run` runs from it."""
    assert tpu.parse_args(["install", *WHERE]).source == str(REPO)
    checkout = _fake_checkout(tmp_path / "checkout")
    tar, scp, ssh = tpu.commands(_tpu("install", *WHERE, "--source", str(checkout)))
    subprocess.run(tar, check=True)
    listed = subprocess.run(["tar", "-tzf", tar[2]], capture_output=True, text=True).stdout
    assert sorted(n for n in listed.split() if not n.endswith("/")) == [
        "./lmjax/__init__.py",
        "./setup.cfg",
    ]
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2]]
    assert scp[6] == "my-tpu:lmjax-src.tar.gz" and "--worker=all" in scp
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    os.replace(tar[2], home / "lmjax-src.tar.gz")  # what scp does
    _executable(home / "bin" / "uv", _FAKE_UV)
    _executable(home / "bin" / "curl", "#!/bin/sh\nexit 9\n")  # uv is there: never fetched
    env = dict(os.environ, HOME=str(home), PATH=f"{home / 'bin'}:{os.environ['PATH']}")
    p = subprocess.run(
        ["bash", "-c", _remote_script(ssh)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    assert (home / "lmjax-src" / "setup.cfg").exists()
    venv = home / "lmjax-venv"
    assert (home / "uv-calls").read_text().splitlines() == [
        f"{home}/lmjax-src: venv --allow-existing --python 3.12 {venv}",
        f"{home}/lmjax-src: pip install --python {venv}/bin/python --upgrade .[tpu]",
    ]
    _executable(home / "bin" / "curl", "#!/bin/sh\necho 0\n")  # metadata: worker 0
    run = _remote_script(tpu.commands(_tpu("run", *WHERE, "--", "lmjax", "train", "--x"))[0])
    p = subprocess.run(
        ["bash", "-c", run], cwd=home, env=env, capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 0 and p.stdout == f"lmjax from {venv}: train --x\n", p.stderr


def test_tpu_install_pinned_git_revision_and_delete():
    (ssh,) = tpu.commands(_tpu("install", *WHERE, "--git", "https://github.com/me/lmjax@3f2c1a0"))
    script = _remote_script(ssh)
    assert "uv venv --allow-existing --python 3.12" in script
    assert script.endswith("'lmjax[tpu] @ git+https://github.com/me/lmjax@3f2c1a0'")
    assert tpu.commands(_tpu("delete", *WHERE)) == [
        [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "delete",
            "my-tpu",
            "--zone=us-east5-a",
            "--project=my-proj",
            "--quiet",
        ]
    ]
    assert tpu.commands(_tpu("delete", *WHERE, "--num-slices", "2"))[0][3:5] == [
        "queued-resources",
        "delete",
    ]
    assert "--force" in tpu.commands(_tpu("delete", *WHERE, "--num-slices", "2"))[0]


class _FakeCloud:
    """Scripted results for supervise(): run exit codes and TPU states, in order."""

    def __init__(self, run_codes, states):
        self.run_codes, self.states, self.calls = list(run_codes), list(states), []

    def together(self, cmds):
        self.calls.append(("run", len(cmds)))
        return self.run_codes.pop(0)

    def each(self, cmds):
        self.calls.append((cmds[0][4] if cmds[0][0] == "gcloud" else cmds[0][0],))
        return 0

    def status(self, args):
        return self.states.pop(0)


def _supervise(fake, *extra):
    args = _tpu(
        "supervise",
        *WHERE,
        "--accelerator-type",
        "v5p-64",
        "--spot",
        "--retry-wait",
        "5",
        *extra,
        "--",
        "lmjax",
        "train",
    )
    slept = []
    code = tpu.supervise(
        args,
        together=fake.together,
        each=fake.each,
        status=fake.status,
        sleep=slept.append,
        log=lambda msg: None,
    )
    return code, slept


def test_supervise_recreates_after_preemption_and_reruns():
    fake = _FakeCloud(run_codes=[255, 0], states=["PREEMPTED"])
    code, slept = _supervise(fake)
    assert code == 0 and slept == [5.0]
    assert fake.calls == [("run", 1), ("delete",), ("create",), ("tar",), ("run", 1)]


def test_supervise_does_not_retry_a_failure_on_a_healthy_tpu():
    fake = _FakeCloud(run_codes=[1], states=["READY"])
    assert _supervise(fake) == (1, [])
    assert fake.calls == [("run", 1)]


def test_supervise_reruns_in_place_after_the_watchdog_exit_on_a_healthy_tpu():
    fake = _FakeCloud(run_codes=[tpu.RETRY_EXIT, 0], states=["READY"])
    assert _supervise(fake) == (0, [])
    assert fake.calls == [("run", 1), ("run", 1)]  # nothing deleted or recreated
    fake = _FakeCloud(run_codes=[tpu.RETRY_EXIT] * 3, states=["READY"] * 3)
    assert _supervise(fake, "--max-restarts", "2")[0] == tpu.RETRY_EXIT


def test_supervise_gives_up_after_max_restarts():
    fake = _FakeCloud(run_codes=[255, 255, 255], states=["", "PREEMPTED", "PREEMPTED"])
    code, slept = _supervise(fake, "--max-restarts", "2")
    assert code == 255 and slept == [5.0, 5.0]
    assert [c for c in fake.calls if c[0] == "run"] == [("run", 1)] * 3


def test_supervise_dry_run_lists_the_recovery():
    lines = tpu.dry_run_lines(
        _tpu("supervise", *WHERE, "--accelerator-type", "v5p-64", "--spot", "--", "lmjax", "train")
    )
    assert lines[0].startswith("gcloud compute tpus tpu-vm ssh my-tpu ")
    assert lines[1].startswith("# if the run fails")
    commands = [shlex.split(l) for l in lines[2:]]
    assert [c[3:5] for c in commands if c[0] == "gcloud"] == [
        ["tpu-vm", "describe"],
        ["tpu-vm", "delete"],
        ["tpu-vm", "create"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "ssh"],
    ]
    assert commands[3][0] == "tar" and "python 3.12" in commands[-1][-1]  # reinstall: checkout
    assert commands[2][-1] == "--spot"


@pytest.mark.parametrize(
    "accelerator, chips, hosts, per_host, topology",
    [
        ("v5p-64", 32, 8, 4, "2x4x4"),
        ("v4-32", 16, 4, 4, "2x2x4"),
        ("v5p-8", 4, 1, 4, "2x2x1"),
        ("v5litepod-16", 16, 4, 4, "4x4"),
        ("v5litepod-8", 8, 1, 8, "2x4"),
        ("v6e-256", 256, 64, 4, "16x16"),
        ("v6e-4", 4, 1, 4, "2x2"),
    ],
)
def test_slice_shapes(accelerator, chips, hosts, per_host, topology):
    s = slice_shape(accelerator)
    assert (s.chips, s.hosts, s.chips_per_host, s.topology) == (chips, hosts, per_host, topology)


def test_slice_shape_errors():
    with pytest.raises(ValueError, match="N must be even"):
        slice_shape("v5p-7")
    with pytest.raises(ValueError, match="does not fit"):
        slice_shape("v5p-64", "4x4")
    with pytest.raises(ValueError, match="not a power of two"):
        slice_shape("v6e-24")
    assert slice_shape("v6e-24", "4x6").hosts == 6


def test_gke_jobset_manifest(capsys):
    user_command = ["lmjax", "train", "--set", *HOSTILE]
    argv = [
        "--name",
        "run1",
        "--accelerator-type",
        "v5p-64",
        "--num-slices",
        "2",
        "--spot",
        "--image",
        "us-docker.pkg.dev/p/r/lmjax:tpu",
        "--cluster",
        "c1",
        "--project",
        "p",
        "--zone",
        "z",
        "--dry-run",
        "--",
        *user_command,
    ]
    assert gke.main(argv) == 0
    text = capsys.readouterr().out
    doc = yaml.safe_load(text)
    assert doc == gke.jobset(gke.parse_args(argv))  # nothing in the header leaked into YAML
    assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "run1"
    (rjob,) = doc["spec"]["replicatedJobs"]
    assert rjob["replicas"] == 2
    job = rjob["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 8 and job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
        "cloud.google.com/gke-tpu-topology": "2x4x4",
        "cloud.google.com/gke-spot": "true",
    }
    assert pod["tolerations"][0]["key"] == "cloud.google.com/gke-spot"
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["command"][:2] == ["bash", "-c"]
    words = shlex.split(container["command"][2])
    assert words == ["exec", *user_command]  # the image has lmjax: nothing installed at start
    assert container["image"] == "us-docker.pkg.dev/p/r/lmjax:tpu"
    xpk = next(l for l in text.splitlines() if l.startswith("# equivalent: "))
    assert xpk.startswith(
        "# equivalent: xpk workload create --cluster=c1 --workload=run1 "
        "--tpu-type=v5p-64 --num-slices=2 "
    )


def test_gke_container_script_runs_in_bash(tmp_path):
    args = gke.parse_args(
        [
            "--name",
            "r",
            "--accelerator-type",
            "v6e-8",
            "--image",
            "i",
            "--",
            "printf",
            "<%s>\n",
            *HOSTILE,
        ]
    )
    script = gke.jobset(args)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"
    ][0]["command"]
    p = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and p.stdout == "".join(f"<{w}>\n" for w in HOSTILE)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--name", "Bad_Name", "--accelerator-type", "v5p-8", "--image", "i", "--", "lmjax"],
            "--name",
        ),
        (
            [
                "--name",
                "r",
                "--accelerator-type",
                "v5litepod-8",
                "--num-slices",
                "2",
                "--image",
                "i",
                "--",
                "lmjax",
            ],
            "multi-host slices",
        ),
        (["--name", "r", "--accelerator-type", "v5p-64", "--image", "i"], "give the command"),
        (["--name", "r", "--accelerator-type", "v5p-64", "--", "lmjax"], "--image"),
    ],
)
def test_gke_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        gke.parse_args(argv)
    assert message in capsys.readouterr().err


def test_checked_in_sbatch_is_the_default_rendering():
    assert (REPO / "launch" / "slurm.sbatch").read_text() == slurm.render()


def test_sbatch_layouts(tmp_path):
    per_gpu = slurm.render(
        ["printf", "<%s>\n", *HOSTILE], nodes=4, gpus_per_node=4, partition="gpu", time="2:00:00"
    )
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=4\n#SBATCH --gpus-per-node=4\n" in per_gpu
    assert "#SBATCH --partition=gpu\n" in per_gpu and "JAX_LOCAL_DEVICE_IDS" not in per_gpu
    assert "\nsrun --kill-on-bad-exit=1 printf " in per_gpu
    # The baked-in command reaches srun word for word (fake srun: drop its option, exec).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", '#!/bin/sh\nshift\nexec "$@"\n')
    p = subprocess.run(
        ["bash", "-c", per_gpu],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
        timeout=30,
    )
    assert p.returncode == 0 and p.stdout == "".join(f"<{w}>\n" for w in HOSTILE)
    per_node = slurm.render(["lmjax", "train"], nodes=2, gpus_per_node=8, tasks="node")
    assert "#SBATCH --ntasks-per-node=1\n" in per_node
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7\n" in per_node
    for script in (per_gpu, per_node, slurm.render()):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    with pytest.raises(ValueError, match="one word"):
        slurm.render(["lmjax"], partition="gpu; rm -rf ~")


def test_sbatch_runs_the_command_from_the_given_python_environment(tmp_path):
    """--venv (or LMJAX_VENV for the checked-in script) is activated before srun."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    _executable(venv / "bin" / "lmjax", f'#!/bin/sh\necho "lmjax from {venv}: $*"\n')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", '#!/bin/sh\nshift\nexec "$@"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    baked = slurm.render(["lmjax", "train"], venv=str(venv))
    p = subprocess.run(["bash", "-c", baked], capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0 and p.stdout == f"lmjax from {venv}: train\n", p.stderr
    p = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm.sbatch"), "lmjax", "eval"],
        capture_output=True,
        text=True,
        env=dict(env, LMJAX_VENV=str(venv)),
        timeout=30,
    )
    assert p.returncode == 0 and p.stdout == f"lmjax from {venv}: eval\n", p.stderr


_PLACEHOLDERS = {
    "NAME": "my-run",
    "Z": "us-east5-a",
    "P": "my-proj",
    "X": "smoke",
    "IMAGE": "us-docker.pkg.dev/my-proj/lmjax/lmjax:tpu",
}


def _documented_commands() -> list[list[str]]:
    """Commands in the READMEs' bash blocks and the launcher docstrings that start with
    `python launch/`, `sbatch` or `lmjax` (continuation lines joined, $T expanded as
    launch/README.md sets it)."""
    texts = [
        block
        for doc in ("README.md", "launch/README.md")
        for block in re.findall(r"```bash\n(.*?)```", (REPO / doc).read_text(), re.S)
    ]
    texts += [m.__doc__ for m in (tpu, gke, slurm)]
    commands = []
    for text in texts:
        joined = re.sub(r"\\\n\s*", " ", text)
        for line in joined.splitlines():
            line = line.strip().split(" > ")[0].split(" # ")[0]
            line = line.replace("$T", "--name my-run --zone us-east5-a --project my-project")
            line = re.sub(r" \[[^\]]*\]", "", line)  # usage lines: [optional] parts
            line = re.sub(r"\b(NAME|Z|P|IMAGE|X)\b", lambda m: _PLACEHOLDERS[m.group(1)], line)
            if re.match(r"(python launch/\w+\.py|sbatch|lmjax) ", line):
                words = shlex.split(line.replace("...", "x"))
                if "x" not in words:  # "... -- lmjax train ..." elides arguments: skipped
                    commands.append(words)
    return commands


def _check_lmjax(argv: list[str]) -> None:
    from lmjax import cli
    from lmjax.commands.experiment import load_experiment

    args = cli.build_parser().parse_args(argv)
    if hasattr(args, "overrides"):
        load_experiment(args.experiment, args.overrides)  # every --set key exists


def test_every_documented_launch_command_parses(monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # --source . is this checkout
    commands = _documented_commands()
    launchers = {
        "tpu": tpu.parse_args,
        "gke": gke.parse_args,
        "slurm": lambda a: slurm.main(a) == 0 or pytest.fail(str(a)),
    }
    seen = set()
    for words in commands:
        if words[0] == "python":
            name = Path(words[1]).stem
            seen.add(name)
            if name == "local":
                continue  # exercised for real above
            args = launchers[name](words[2:])
            inner = getattr(args, "command", None) or (
                words[words.index("--") + 1 :] if "--" in words else []
            )
        elif words[0] == "sbatch":
            inner = words[next(i for i, w in enumerate(words) if w.endswith(".sbatch")) + 1 :]
        else:
            inner = words
        if inner[:1] == ["lmjax"]:
            _check_lmjax(inner[1:])
    assert {"tpu", "gke", "slurm", "local"} <= seen and len(commands) > 15
    capsys.readouterr()


def test_dockerfile_installs_this_checkout_on_python_312_with_existing_extras():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.12", text, re.M)
    assert "COPY . ." in text and 'pip install --no-cache-dir ".[${EXTRA}]"' in text
    extras = re.search(
        r"\[options.extras_require\]\n((?:.*\n)*?)\n", (REPO / "setup.cfg").read_text()
    )
    names = set(re.findall(r"^(\w+) =", extras.group(1), re.M))
    assert {"tpu", "gpu"} <= names
    assert re.search(r"^ARG EXTRA=tpu$", text, re.M)
    requires = re.search(r"python_requires\s*=\s*>=\s*3\.(\d+)", (REPO / "setup.cfg").read_text())
    assert int(requires.group(1)) <= 12  # the image's Python satisfies setup.cfg


def _docker_excludes(pattern_lines: list[str]) -> list[re.Pattern[str]]:
    """.dockerignore lines as regexes over slash-separated paths from the context root, as
    Docker reads them: `**` spans directories, `*` and `?` stay within one name, a leading
    `/` is dropped."""
    patterns = []
    for line in pattern_lines:
        line = line.strip().strip("/")
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not modelled by this test"
        parts = re.split(r"(\*\*/?|\*|\?)", line)
        wild = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        patterns.append(re.compile("".join(wild.get(p, re.escape(p)) for p in parts)))
    return patterns


def test_docker_build_context_holds_what_pip_install_needs_and_no_stale_build():
    """The files `COPY . .` puts into the image: every file of this checkout that no
    .dockerignore pattern matches, itself or through a parent directory (plus planted stale
    build outputs, which must be left out)."""
    excludes = _docker_excludes((REPO / ".dockerignore").read_text().splitlines())

    def excluded(path: str) -> bool:
        parts = path.split("/")
        prefixes = ("/".join(parts[: i + 1]) for i in range(len(parts)))
        return any(p.fullmatch(prefix) for prefix in prefixes for p in excludes)

    context = set()
    for root, dirs, files in os.walk(REPO):
        rel = Path(root).relative_to(REPO).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirs[:] = [d for d in dirs if not excluded(rel + d)]  # no exceptions: prune
        context |= {rel + f for f in files if not excluded(rel + f)}
    planted = [
        "build/lib/lmjax/config.py",
        "dist/lmjax-0.1.0.tar.gz",
        "lmjax.egg-info/PKG-INFO",
        "lmjax/model/__pycache__/transformer.cpython-312.pyc",
        ".venv/bin/python",
        "runs/quickstart/config.json",
        ".git/HEAD",
    ]
    assert not [p for p in planted if not excluded(p)]
    assert not [p for p in context if p.split("/")[0] in {"build", "dist", ".git", ".venv"}]
    assert {"pyproject.toml", "setup.cfg", "README.md", "lmjax/__init__.py"} <= context
    assert {"lmjax/experiments/README.md", "lmjax/experiments/quickstart.py"} <= context
    assert {"lmjax/data/corpus/README.md", "lmjax/data/corpus/hamlet.txt"} <= context
    assert not excluded("lmjax/build_info.py") and not excluded("docs/dist.md")  # whole names
