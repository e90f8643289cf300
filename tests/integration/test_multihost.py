"""Two real processes x 4 CPU devices (gloo collectives, started by launch/local.py) train
with the losses of one process with 8 devices: a mixture of experts with its experts split
across the processes, and a hybrid (data across processes) mesh; a tensor axis across
processes; torn checkpoints set aside once."""

import os
import subprocess
import sys

import numpy as np
import pytest

from lmjax import cli
from lmjax.observe import metrics
from tests.helpers import REPO

TRAIN_SETS = [
    "run.steps=3",
    "run.log_every=1",
    "run.eval_batches=1",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "checkpoint.every_steps=1000",
]


def _losses(workdir, name: str = "loss") -> list[float]:
    return [r[name] for r in metrics.read_records(workdir) if name in r]


def _sets(sets):
    return [a for s in sets for a in ("--set", s)]


# 8 query and 8 KV heads: a tensor axis of 4 divides every sharded dimension.
WIDE = ["model.n_heads=8", "model.n_kv_heads=8", "model.head_dim=8"]
# The smoke model as a mixture of experts: 4 experts, 2 per token, the sigmoid router with its
# bias moving (set from the step's counts over all devices of both processes), dropless.
MOE = WIDE + [
    "model.moe_experts=4",
    "model.moe_top_k=2",
    "model.moe_router=sigmoid_topk_bias",
    "optim.moe_bias_rate=1e-3",
    "optim.moe_aux_loss=0.01",
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The MoE smoke run of this (8-device, all-fsdp) process: its workdir, and the tokenizer
    it trained for the others."""
    workdir = tmp_path_factory.mktemp("one_process")
    argv = ["train", "--experiment", "smoke", "--workdir", str(workdir)]
    assert cli.main([*argv, *_sets(TRAIN_SETS + MOE)]) == 0
    return workdir, str(workdir / "tokenizer.model")


@pytest.mark.parametrize(
    "mesh_sets",
    [
        # expert 2 x tensor 4: the mesh is laid out process by process, so each process holds
        # one expert shard and the all-to-alls cross the processes
        ["mesh.expert=2", "mesh.tensor=4", "mesh.fsdp=1"],
        ["mesh.dcn_data=2", "mesh.fsdp=-1"],  # hybrid: data across processes, fsdp within one
    ],
    ids=["expert-across", "hybrid"],
)
def test_two_processes_train_like_one(tmp_path, one_process, mesh_sets):
    """The losses and balance losses (and so the router biases they depend on) of one
    process with 8 devices."""
    reference, tokenizer = one_process
    sets = MOE + mesh_sets + [f"data.tokenizer={tokenizer}"]
    output = _run([*_two_processes(4), "--", *_train_command(tmp_path, sets)])
    assert "[p1]" in output and "process 1/2" in output  # both processes ran
    for name in ("loss", "moe_balance"):
        got = _losses(tmp_path, name)
        assert len(got) == 3 and len(set(got)) == 3
        np.testing.assert_allclose(got, _losses(reference, name), rtol=1e-5)


def _two_processes(devices_per_process: int) -> list[str]:
    """launch/local.py starting two processes (the command follows a "--")."""
    return [
        sys.executable,
        str(REPO / "launch" / "local.py"),
        "--processes",
        "2",
        "--devices-per-process",
        str(devices_per_process),
    ]


def _train_command(workdir, sets):
    return [
        sys.executable,
        "-m",
        "lmjax",
        "train",
        "--experiment",
        "smoke",
        "--workdir",
        str(workdir),
        *_sets(TRAIN_SETS + sets),
    ]


def _run(command, **env):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, **env}
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    "devices_per_process, sets",
    # tensor 4 over 2 processes of 2 devices: tensor spans the processes and the batch is not
    # split, so both processes feed all of it (one device per process adds nothing to that)
    [(2, ["mesh.tensor=4", "mesh.fsdp=1"] + WIDE)],
    ids=["2x2-tensor4"],
)
def test_tensor_axis_across_processes_trains_like_one_process(
    tmp_path, one_process, devices_per_process, sets
):
    """A mesh axis that does not split the batch spans the processes: every process must
    feed the rows its devices hold (here all of them), not an equal share."""
    sets = sets + [f"data.tokenizer={one_process[1]}"]
    total = 2 * devices_per_process
    _run(
        _train_command(tmp_path / "one", sets),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={total}",
        JAX_PLATFORMS="cpu",
    )
    reference = _losses(tmp_path / "one")
    output = _run(
        [*_two_processes(devices_per_process), "--", *_train_command(tmp_path / "two", sets)]
    )
    assert "process 1/2" in output
    got = _losses(tmp_path / "two")
    assert len(got) == 3 and len(set(got)) == 3
    np.testing.assert_allclose(got, reference, rtol=1e-5)


SET_ASIDE = """
import sys, time
from lmjax.parallel import distributed
distributed.initialize()
import jax
from lmjax.checkpoint import checkpointer
from lmjax.config import Config, DataConfig, ModelConfig
from lmjax.parallel import sharding
from lmjax.train import trainer
cfg = Config(
    model=ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=8, d_mlp=32, max_seq_len=16, dtype="float32"),
    data=DataConfig(source="synthetic", batch_size=2, seq_len=8),
)
state = trainer.make_trainer(cfg, sharding.make_mesh(cfg.mesh)).init_fn()
ckpt = checkpointer.Checkpointer(sys.argv[1], cfg.checkpoint, resumed_at=4)
if jax.process_index() == 1:
    time.sleep(3)  # process 0 has moved the newer steps before this process could list them
ckpt.save(5, state, data_state={}, meta={})
ckpt.close()
print("committed", ckpt.steps())
"""


def test_two_processes_set_aside_torn_steps_once_and_save(tmp_path):
    """A run resumed at step 4 finds a torn step 6 and an unfinished save of 5: process 0 alone
    moves them, and both processes pass the same barriers even when one lists after the
    move (a per-process listing would leave it out of the barrier: a deadlock)."""
    root = tmp_path / "checkpoints"
    (root / "6" / "params").mkdir(parents=True)
    (root / "6" / "params" / "junk").write_bytes(b"torn")
    (root / "5.orbax-checkpoint-tmp-99").mkdir()
    script = tmp_path / "set_aside.py"
    script.write_text(SET_ASIDE)
    command = [*_two_processes(1), "--timeout", "120", "--", sys.executable, str(script), str(root)]
    output = _run(command, PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)))
    assert "[p0] committed [5]" in output and "[p1] committed [5]" in output, output[-3000:]
    moved = sorted(p.name.rsplit("-", 1)[0] for p in (root / "unreadable").iterdir())
    assert moved == ["5.orbax-checkpoint-tmp-99", "6"]
    assert sorted(p.name for p in root.iterdir()) == ["5", "unreadable"]
