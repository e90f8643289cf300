"""Test-wide JAX set-up: 8 CPU devices, float32 numerics at full matmul precision; the tiers.

Tests live by tier: tests/unit/ is the fast tier (`pytest tests/unit`, about a minute), and
everything under tests/integration/ (real processes, orbax runs, the GCS server, installs,
compiles, end-to-end training) is marked `slow` here, so `-m "not slow"` selects the same set.

These variables must be set before jax is imported anywhere in the test process.
"""

import itertools
import os
import pathlib
import re
import subprocess

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
# Implicit rank promotion ([B, T] + [T]) hides shape bugs: every test runs with it an error.
jax.config.update("jax_numpy_rank_promotion", "raise")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# These import jax: after the set-up.
from lmjax.data.pipeline import synthetic_batch  # noqa: E402
from lmjax.parallel import host_rows, sharding  # noqa: E402
from lmjax.train import trainer as trainer_lib  # noqa: E402
from tests.configs import TINY_RUN  # noqa: E402
from tests.helpers import FakeGcs, hamlet_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """The Hamlet tokenizer with BOS (id 2), trained once per session: 300 pieces, so that
    models reading its ids need vocab_size >= 300."""
    tok = hamlet_tokenizer(bos_id=2)
    assert tok.vocab_size == 300
    return tok


@pytest.fixture(params=["jit", "eager"])
def maybe_jit(request):
    """Runs a numerics test twice: `maybe_jit(f, **jit_kwargs)` is `jax.jit(f, ...)` in the jit
    run, and `f` itself in the eager run, where the whole test runs under `jax.disable_jit()`
    (lmjax's own jits and scans too: Python control flow and dtype promotion op by op).
    A test picks a subset with `@pytest.mark.parametrize("maybe_jit", ["eager"], indirect=True)`.
    """
    if request.param == "jit":
        yield jax.jit
        return
    with jax.disable_jit():
        yield lambda f, **_: f


@pytest.fixture(scope="session")
def trained():
    """tests/configs.TINY_RUN trained for 7 steps on synthetic batches over the 8 devices, once
    per session (the checkpoint tests of both tiers read it; none may change it): (trainer,
    [the state after steps 1..7 as numpy trees], [each step's metrics])."""
    trainer = trainer_lib.make_trainer(TINY_RUN, sharding.make_mesh(TINY_RUN.mesh))
    state = trainer.init_fn()
    data = TINY_RUN.data
    states, metrics = [], []
    for step in range(1, 8):
        batch = synthetic_batch(
            0, 0, step, range(data.batch_size), data.seq_len, TINY_RUN.model.vocab_size
        )
        state, m = trainer.step_fn(state, host_rows.global_batch(batch, trainer.batch_sharding))
        states.append(jax.tree.map(np.asarray, state))
        metrics.append(m)
    return trainer, states, metrics


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """One fake-gcs-server (tests/helpers.FakeGcs) for the whole session, on 127.0.0.1 at a
    free port, in memory; stopped when the session ends. Tests use `gcs_bucket` instead."""
    server = FakeGcs(str(tmp_path_factory.mktemp("fake-gcs")))
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch, request):
    """A fresh, empty bucket on the session's GCS server, as "gs://NAME", with
    STORAGE_EMULATOR_HOST set (for this test and the subprocesses it starts) and nothing else:
    lmjax derives every other client's setting from that one variable, as a user's process
    would. Usage:

        def test_x(gcs_bucket):
            workdir = f"{gcs_bucket}/run"   # then `lmjax train --workdir {workdir}` etc.
    """
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40]
    return gcs_server.bucket(f"{name}-{next(_BUCKET_NUMBERS)}")


_BUCKET_NUMBERS = itertools.count()


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 1 MiB tmpfs (room for a few TINY checkpoints), or None where mounting
    is not permitted (not root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(params=["local", "gs"])
def storage_root(request, tmp_path, monkeypatch):
    """Runs the test twice: with a local directory and with a folder of a fresh bucket (as a
    string). The cwd is tmp_path both times, and the gs:// run fails if a local folder named
    `gs:` appeared in it (a user path that bypassed lmjax.storage)."""
    monkeypatch.chdir(tmp_path)
    if request.param == "local":
        yield str(tmp_path / "root")
        return
    yield request.getfixturevalue("gcs_bucket") + "/root"
    assert not [p for p in tmp_path.rglob("gs:")], "a local gs: folder appeared"


_INTEGRATION = pathlib.Path(__file__).resolve().parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """The folder is the tier: every test under integration/ gets the `slow` marker, and a
    `slow` marker written on a test elsewhere is an error (move the test instead)."""
    misplaced = []
    for item in items:
        if item.path.is_relative_to(_INTEGRATION):
            item.add_marker(pytest.mark.slow)
        elif item.get_closest_marker("slow"):
            misplaced.append(item.nodeid)
    if misplaced:
        raise pytest.UsageError(
            "marked slow outside tests/integration/ (move them there): " + ", ".join(misplaced)
        )
