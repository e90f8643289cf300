"""Two real processes x 4 CPU devices (gloo collectives, started by launch/local.py) train
with the losses of one process with 8 devices: a mixture of experts with its experts split
across the processes, and a hybrid (data across processes) mesh; a tensor axis across
processes; torn checkpoints set aside once; the offline commands (eval, generate, export,
to-hf) over both processes' devices give the one-process results."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lmjax import cli
from lmjax.checkpoint import compat, listing, params_dir
from lmjax.commands import convert, evaluate, generate
from lmjax.observe import metrics
from tests import numpy_llama
from tests.helpers import REPO
from tests.unit.test_convert import BASE, read_hf_tensors, write_hf_dir

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


OFFLINE = """
import json, sys
from lmjax.parallel import distributed
distributed.initialize()
import jax
from lmjax import cli
from lmjax.inference import saved_run
workdir, out, llama = sys.argv[1:]
_, params, _ = saved_run.load(workdir, None)
leaves, held = jax.tree.leaves(params), {}
for i, x in enumerate(leaves):
    held.update({(i, str(s.index)): s.data.nbytes for s in x.addressable_shards})
print("restored", json.dumps({
    "devices": sorted({len(x.sharding.device_set) for x in leaves}),
    "any_fully_addressable": any(x.is_fully_addressable for x in leaves),
    "held_bytes": sum(held.values()),
    "total_bytes": sum(x.nbytes for x in leaves),
    "replicated_bytes": sum(x.nbytes for x in leaves if x.is_fully_replicated),
}))
prompts = [a for p in PROMPTS for a in ("--prompt", p)]
for argv in (
    ["eval", "--workdir", workdir, "--experiment-data", "--json"],
    ["checkpoint", "export", workdir, "--params-only", out + "/params"],
    ["convert", "to-hf", llama, out + "/hf"],
    ["generate", "--workdir", workdir, *prompts, "--max-new-tokens", "4"],
):
    assert cli.main(argv) == 0, argv
"""
PROMPTS = ["ROMEO:", "To be, or not"]


def test_offline_commands_over_two_processes_match_one(tmp_path, one_process):
    """eval, generate, checkpoint export and convert to-hf started as 2 processes x 4 devices
    restore onto a mesh over all 8 devices (each process holds half of every parameter) and
    give this 8-device process's results (the export: the checkpoint's params; to-hf: the
    source HF tensors), printed and written once, by process 0."""
    workdir = str(one_process[0])
    tensors = numpy_llama.random_checkpoint(BASE, seed=6)
    convert.from_hf(str(write_hf_dir(tmp_path / "hf", BASE, tensors)), str(tmp_path / "llama"))
    want_eval = evaluate.main(workdir, use_experiment_data=True)
    want_text = generate.main(workdir, None, PROMPTS, 4)
    config, want, _ = listing.load_params(workdir)  # what the export must hold
    script = tmp_path / "offline.py"
    script.write_text(f"PROMPTS = {PROMPTS!r}\n" + OFFLINE)
    two = tmp_path / "two"
    output = _run(
        [
            *_two_processes(4),
            "--",
            sys.executable,
            str(script),
            workdir,
            str(two),
            str(tmp_path / "llama"),
        ],
        PYTHONPATH=os.environ.get("PYTHONPATH", str(REPO)),
    )
    lines = [line.split(" ", 1) for line in output.splitlines() if line.startswith("[p")]
    for p in ("[p0]", "[p1]"):
        (restored,) = [
            json.loads(t[len("restored ") :])
            for q, t in lines
            if q == p and t.startswith("restored ")
        ]
        assert restored["devices"] == [8] and not restored["any_fully_addressable"]
        # half of each array, but for the MoE router biases ([layers, experts]: no embed)
        replicated = restored.pop("replicated_bytes")
        assert 0 < replicated < 100
        assert 2 * (restored["held_bytes"] - replicated) == restored["total_bytes"] - replicated
    (got_eval,) = [json.loads(t) for q, t in lines if t.startswith('{"loss"')]
    # The same program over the same 8-device mesh, but gloo's all-reduce sums in another
    # order: the float32 NLL sum may differ in its last bit (measured: by one ulp).
    assert got_eval["tokens"] == want_eval["tokens"]
    np.testing.assert_allclose(got_eval["loss"], want_eval["loss"], rtol=2.4e-7)
    assert [q for q, t in lines if t.startswith("wrote ")] == ["[p0]", "[p0]"]
    cfg, got = params_dir.load(two / "params")
    assert cfg == config.model
    jax.tree.map(np.testing.assert_array_equal, got, want)
    record = json.loads((two / "params" / compat.TOKENIZER_RECORD).read_text())
    assert record["step"] == 3 and record["workdir"] == workdir
    written = read_hf_tensors(two / "hf")
    assert sorted(written) == sorted(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(written[name], array, err_msg=name)
    text = "\n".join(t for q, t in lines if q == "[p0]")
    assert all(f"{completion}\n{'-' * 40}" in text for completion in want_text)
    assert [q for q, t in lines if t == "-" * 40] == ["[p0]", "[p0]"]


def test_convert_from_hf_started_as_two_processes_is_refused_before_reading(tmp_path):
    """Every process would write the same params directory: each refuses from its environment,
    before the HF directory is read (here it does not exist) or the output made."""
    out = tmp_path / "llama"
    command = [sys.executable, "-m", "lmjax", "convert", "from-hf", str(tmp_path / "hf"), str(out)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [*_two_processes(1), "--", *command], env=env, cwd=REPO, capture_output=True, text=True
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-4000:]
    assert "convert from-hf was started as 2 processes (explicit start)" in output
    assert "run it as one process" in output and not out.exists()
