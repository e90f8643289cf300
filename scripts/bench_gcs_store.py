"""The README's gs:// store figures, in one run: a store prepared on a GCS server (by 1 and
by 2 worker processes) and read by `lmjax bench data` with `--delay-ms` added to every
request, and the start-up cost of finding a run's store among 1,000 input files with and
without the workdir record.

    PYTHONPATH=. python scripts/bench_gcs_store.py --out /tmp/gcs_bench --size-mb 30 --files 16

The server is fake-gcs-server (the tests' `tests.helpers.FakeGcs`, in memory on 127.0.0.1);
`lmjax.tools.delay_proxy` sits in front of it and every lmjax process reaches it only through
STORAGE_EMULATOR_HOST, as a user's would reach a real bucket.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from lmjax import storage
from lmjax.commands.experiment import load_experiment
from lmjax.config import DataConfig
from lmjax.data import run_stores
from lmjax.data.pipeline import make_pipeline
from lmjax.data.tokenizer import load_tokenizer
from tests.helpers import FakeGcs, store_objects, untimed_objects

_EXPERIMENT = """from lmjax.config import *
def config():
    return Config(model=ModelConfig(max_seq_len={seq}),
        data=DataConfig(source="text", text_files={files!r}, seq_len={seq},
        batch_size={batch}, tokenizer_vocab_size=2048, store_dir={store!r}))
"""


def _lmjax(args: list[str], env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "lmjax", *args], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"lmjax {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    print(out.stdout, flush=True)
    return out.stdout


def _proxy(target_port: int, delay_ms: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmjax.tools.delay_proxy",
            f"--target=127.0.0.1:{target_port}",
            f"--delay-ms={delay_ms}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    return proc, "http://" + line.split()[-1]


def bench_reads(args, env: dict, bucket: str) -> None:
    corpus = os.path.join(args.out, "corpus")
    if not os.path.isdir(corpus):
        subprocess.run(
            [sys.executable, "scripts/make_bench_corpus.py", "--out", corpus]
            + ["--size-mb", str(args.size_mb), "--files", str(args.files)],
            check=True,
        )
    experiment = os.path.join(args.out, "gcs_exp.py")
    with open(experiment, "w") as f:
        f.write(
            _EXPERIMENT.format(
                files=corpus, seq=args.seq_len, batch=args.batch, store=f"{bucket}/stores"
            )
        )
    base = ["--experiment", experiment, "--workdir", os.path.join(args.out, "run")]
    _lmjax(["data", "prepare", *base], env)  # trains the tokenizer too: timed again below
    for run, workers in enumerate((1, 2, 1, 2)):  # interleaved: the machine's load drifts
        store = f"{bucket}/stores-{workers}w-{run // 2}"
        _lmjax(
            ["data", "prepare", *base, "--workers", str(workers)]
            + ["--set", f"data.store_dir={store}"],
            env,
        )
    _same_objects(f"{bucket}/stores-1w-0", f"{bucket}/stores-2w-0", env)
    for step in (0, 10**7):
        _lmjax(
            ["bench", "data", *base, "--seconds", str(args.seconds), "--start-step", str(step)], env
        )
    for step in (0, 10**7):
        subprocess.run(
            [sys.executable, __file__, "--out", args.out, "--first-batch", str(step)],
            env=env,
            check=True,
        )


def _same_objects(a: str, b: str, env: dict) -> None:
    """Prints whether the stores under `a` and `b` hold the same objects, byte for byte
    (their JSON records but for the timings of the run that wrote them)."""
    os.environ.update(env)
    storage.follow_emulator()
    (name,) = {n.rsplit("/", 1)[-1] for n in storage.glob(f"{a}/*")}  # the store's folder
    objects = [untimed_objects(store_objects(f"{root}/{name}")) for root in (a, b)]
    print(f"{a} and {b}: {len(objects[0])} objects, identical: {objects[0] == objects[1]}")


def first_batch(experiment: str, workdir: str, step: int) -> None:
    """Prints the seconds from a loaded tokenizer to the first batch at `step` (the workdir
    record, store.json, the first reads), in this fresh process: the store's part of a start."""
    config = load_experiment(experiment, [])
    tok = load_tokenizer(os.path.join(workdir, "tokenizer.model"))
    start = time.perf_counter()
    stores = run_stores.run_stores(config.data, tok, workdir, leader=False)
    make_pipeline(config.data, tok, stores=stores).train_batch(step)
    print(
        f"store part of a start, record to first batch at step {step}: "
        f"{time.perf_counter() - start:.2f} s",
        flush=True,
    )


def _median_s(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_locate(args, env: dict, bucket: str) -> None:
    """Median time to find the store of 1,000 input files at a start: listing and sizing them
    (what every process did at every start before the record) against reading the workdir
    record, in a local workdir and in a gs:// one (through the delay)."""
    inputs = os.path.join(args.out, "inputs1000")
    os.makedirs(inputs, exist_ok=True)
    for i in range(1000):
        with open(os.path.join(inputs, f"part{i:04d}.txt"), "w") as f:
            f.write(f"document {i} of the location benchmark, first\fdocument {i}, second\f")
    os.environ.update(env)
    tok = load_tokenizer(os.path.join(args.out, "run", "tokenizer.model"))
    root = os.path.join(args.out, "stores1000")
    cfg = DataConfig(source="text", text_files=inputs, store_dir=root, seq_len=4)
    local, remote = os.path.join(args.out, "run1000"), f"{bucket}/run1000"
    for workdir in (local, remote):
        run_stores.run_stores(cfg, tok, workdir, leader=True)  # prepares once, then records
    listing = _median_s(lambda: run_stores.resolve_stores(cfg, tok, root, leader=False))
    for workdir in (local, remote):
        record = _median_s(lambda w=workdir: run_stores.run_stores(cfg, tok, w, leader=False))
        print(
            f"find the store of 1,000 local input files: listing and sizing them "
            f"{listing * 1e3:.1f} ms; the record in {workdir} {record * 1e3:.1f} ms",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size-mb", type=float, default=50.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16, help="rows one process reads per step")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--first-batch", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_batch >= 0:
        first_batch(
            os.path.join(args.out, "gcs_exp.py"), os.path.join(args.out, "run"), args.first_batch
        )
        return
    os.makedirs(args.out, exist_ok=True)
    server = FakeGcs(args.out)
    proxy, url = _proxy(server.port, args.delay_ms)
    try:
        bucket = server.bucket("bench")
        env = {**os.environ, "STORAGE_EMULATOR_HOST": url}
        print(f"GCS server {server.url}, reached through {url} (+{args.delay_ms} ms a request)")
        bench_reads(args, env, bucket)
        bench_locate(args, env, bucket)
    finally:
        proxy.terminate()
        server.stop()


if __name__ == "__main__":
    main()
