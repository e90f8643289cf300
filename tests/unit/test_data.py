"""Preparation into the TensorStore (zarr3) store and the random-access pipeline, checked against naive
references (sentencepiece on the raw documents, a Python loop over tokens)."""

import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lmjax import cli
from lmjax.batch import BATCH_KEYS
from lmjax.commands import bench as bench_command
from lmjax.config import Config, ConfigError, DataConfig
from lmjax.data import beam_engine, documents, prepare, run_stores, shuffle, sources, store
from lmjax.data.pipeline import DataStateError, make_pipeline
from lmjax.data.prepare import prepare_tokenizer
from lmjax.data.tokenizer import load_tokenizer, train_tokenizer
from lmjax.errors import FaultError
from lmjax.workdir_names import STORE_RECORD
from tests.helpers import untimed

SONNETS = os.path.join(documents.PACKAGED_DIR, "sonnets.txt")


SEQ, BATCH = 32, 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "sonnets"
    return load_tokenizer(train_tokenizer([SONNETS], 384, "bpe", str(prefix)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 sonnets as documents: 30 in a form-feed separated .txt, 20 in a .jsonl, 10 in a
    .jsonl.gz; plus an empty file. Returns (directory, {relative file: documents})."""
    root = tmp_path_factory.mktemp("corpus")
    sonnets = documents.split_text(open(SONNETS).read())[1:61]
    (root / "a.txt").write_text("\f\n".join(sonnets[:30]) + "\f\n\f")  # two empty documents
    (root / "b.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in sonnets[30:50]))
    (root / "c.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"text": s}) + "\n" for s in sonnets[50:]).encode())
    )
    (root / "d.txt").write_text("")
    return str(root), {
        "a.txt": sonnets[:30],
        "b.jsonl": sonnets[30:50],
        "c.jsonl.gz": sonnets[50:],
        "d.txt": [],
    }


def text_cfg(corpus, **kw):
    base = DataConfig(
        source="text",
        text_files=corpus[0],
        seq_len=SEQ,
        batch_size=BATCH,
        validation_fraction=0.1,
        seed=3,
    )
    return dataclasses.replace(base, **kw)


@pytest.fixture(scope="module")
def prepared(corpus, tok, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stores"))
    directory, meta = prepare.prepare(text_cfg(corpus), tok, root)
    return directory, meta


def naive_streams(corpus, tok, fraction=0.1):
    """{split: token stream} built directly: files in name order, documents in file order, a
    document held out when sha256(its text) < fraction * 2**256, each BOS text EOS."""
    streams = {"train": [], "validation": []}
    for name in sorted(corpus[1]):
        for text in corpus[1][name]:
            held = int(hashlib.sha256(text.encode()).hexdigest(), 16) < fraction * 2**256
            streams["validation" if held else "train"] += [
                tok.bos_id,
                *tok.encode(text),
                tok.eos_id,
            ]
    return {k: np.array(v) for k, v in streams.items()}


def naive_batch(stream, step, seq, batch, seed, shuffled=True):
    """Rows of global batch `step` by the rule in pipeline.py, one window at a time."""
    n_windows = (len(stream) - 1) // seq
    rows = []
    for r in range(batch):
        epoch, j = divmod(step * batch + r, n_windows)
        if shuffled:
            j = int(
                shuffle.permute(
                    np.array([j]), n_windows, shuffle.derive_key(seed, 0, 0x5EED, epoch)
                )[0]
            )
        rows.append(stream[j * seq : j * seq + seq + 1])
    return np.stack(rows)


def naive_pack_check(batch, eos):
    """Reference: loop over every row and token, rebuilding segments and positions by hand."""
    for row in range(batch["inputs"].shape[0]):
        inp, tgt = batch["inputs"][row], batch["targets"][row]
        seg, pos, mask = batch["segment_ids"][row], batch["positions"][row], batch["loss_mask"][row]
        assert seg[0] == 1 and pos[0] == 0
        for t in range(1, len(inp)):
            new_doc = inp[t - 1] == eos
            assert seg[t] == seg[t - 1] + new_doc
            assert pos[t] == (0 if new_doc else pos[t - 1] + 1)
        for t in range(len(inp) - 1):
            assert tgt[t] == inp[t + 1]  # targets are inputs shifted by one
        for t in range(len(inp)):
            assert mask[t] == (
                0.0 if inp[t] == eos else 1.0
            )  # an EOS has no target in its document


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def take(pipeline, start, n):
    return list(itertools.islice(pipeline.train_batches(start), n))


def stream_of(directory, meta, split):
    s = store.StoreSplit(directory, split, meta)
    return s.read(np.array([0]), s.n_tokens)[0]


def test_prepare_writes_the_naive_token_streams_and_counts(corpus, tok, prepared, tmp_path):
    directory, meta = prepared
    reference = naive_streams(corpus, tok)
    for split in store.SPLITS:
        np.testing.assert_array_equal(stream_of(directory, meta, split), reference[split])
    assert len(reference["validation"]) and len(reference["train"]) > 5 * len(
        reference["validation"]
    )
    s = meta["summary"]
    assert (s["documents"], s["empty_documents"], s["empty_files"], s["bad_utf8"]) == (60, 2, 1, 0)
    assert s["train_tokens"] + s["validation_tokens"] == sum(map(len, reference.values()))
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == tok.fingerprint
    assert len(meta["shards"]) == 4 and os.path.exists(os.path.join(directory, store.META))
    # A record holds RECORD_TOKENS tokens: the stream crosses records and shards.
    assert (
        meta["shards"][0]["train"]["records"]
        == -(-meta["shards"][0]["train"]["tokens"] // store.RECORD_TOKENS)
        > 1
    )
    # Idempotent: preparing again finds the store and writes nothing.
    stamp = os.stat(os.path.join(directory, store.META)).st_mtime_ns
    again, _ = prepare.prepare(text_cfg(corpus), tok, os.path.dirname(directory))
    assert again == directory and os.stat(os.path.join(directory, store.META)).st_mtime_ns == stamp
    # The key follows the inputs: another tokenizer or validation fraction is another store.
    other, _ = prepare.prepare(text_cfg(corpus, validation_fraction=0.2), tok, str(tmp_path))
    assert os.path.basename(other) != os.path.basename(directory)


def test_bad_utf8_is_an_error_naming_file_and_byte_or_skipped_and_counted(tok, tmp_path):
    good = "first document\f" + "second document ok"
    (tmp_path / "x.txt").write_bytes(good.encode() + b"\fthird \xff broken\fand a fourth")
    cfg = DataConfig(
        source="text",
        text_files=str(tmp_path / "x.txt"),
        validation_fraction=0.5,
        seq_len=4,
        batch_size=1,
    )
    offset = len(good.encode()) + 1 + len("third ")
    with pytest.raises(
        ConfigError, match=rf"x.txt: byte {offset} is not UTF-8.*data.bad_utf8=skip"
    ):
        prepare.prepare(cfg, tok, str(tmp_path / "stores"))
    assert not any(p.endswith(store.META) for _, _, files in os.walk(tmp_path) for p in files)
    _, meta = prepare.prepare(
        dataclasses.replace(cfg, bad_utf8="skip"), tok, str(tmp_path / "stores")
    )
    assert meta["summary"]["bad_utf8"] == 1 and meta["summary"]["documents"] == 3


def _corpus_files(root, n):
    root.mkdir()
    sonnets = documents.split_text(open(SONNETS).read())
    for i in range(n):
        (root / f"part{i:02d}.txt").write_text("\f".join(sonnets[i * 10 : (i + 1) * 10]))
    return DataConfig(
        source="text", text_files=str(root), validation_fraction=0.1, seq_len=SEQ, batch_size=BATCH
    )


def same_store(directory, other):
    """Asserts two stores hold the same files with the same bytes; their JSON records may
    differ only in timings (seconds, tokens_per_second, megabytes_per_second). Lock files of
    killed writers (NAME.__lock) are not part of a store."""

    names, other_names = (
        sorted(
            os.path.relpath(os.path.join(parent, f), d)
            for parent, _, files in os.walk(d)
            for f in files
            if not f.endswith(".__lock")
        )
        for d in (directory, other)
    )
    assert names == other_names and store.META in names
    for name in names:
        a, b = (open(os.path.join(d, name), "rb").read() for d in (directory, other))
        if name.endswith(".json"):
            assert untimed(json.loads(a)) == untimed(json.loads(b)), name
        else:
            assert a == b, name


def _run_files(tmp_path, cfg, tok):
    """(workdir holding the tokenizer, experiment file) for `lmjax data prepare` on `cfg`."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        f"from lmjax.config import *\ndef config():\n    return Config(data={cfg!r})\n"
    )
    return workdir, experiment


def test_beam_in_memory_prepare_equals_inline_byte_for_byte(
    corpus, tok, prepared, tmp_path, caplog
):
    root = str(tmp_path / "stores")
    options = beam_engine.pipeline_options("DirectRunner", 1, "", root)
    with caplog.at_level(logging.INFO):
        directory, meta = prepare.prepare(text_cfg(corpus), tok, root, beam_options=options)
    same_store(directory, prepared[0])
    # Beam's DirectRunner would first try Prism, which downloads a binary from GitHub.
    assert "prism" not in caplog.text.lower()


def test_beam_runner_and_options_mistakes_are_config_errors_before_any_work(
    corpus, tok, tmp_path, capsys
):
    workdir, experiment = _run_files(tmp_path, text_cfg(corpus), tok)
    base = ["data", "prepare", "--experiment", str(experiment), "--workdir", str(workdir)]
    for extra, message in [
        (["--beam-runner", "SparkRuner"], "SparkRuner.*choose one of DirectRunner, Dataflow"),
        (["--workers", "0"], "--workers=0"),
        (["--beam-runner", "FlinkRunner", "--workers", "2"], "sizes the DirectRunner only"),
        (["--beam-runner", "DataflowRunner"], "set data.store_dir=gs://"),
        (["--beam-options=--projet=p"], "'--projet=p' is not a Beam pipeline option"),
        (["--beam-options=--runner=FlinkRunner"], "use --beam-runner"),
        (["--beam-options=--project='p"], "cannot be split like a shell line"),
        (["--beam-options=--direct_num_workers=two"], "a value is invalid"),
    ]:
        assert cli.main(base + extra) == 2, extra
        assert re.search(message, capsys.readouterr().err), extra
    assert os.listdir(workdir) == ["tokenizer.model"]
    options = beam_engine.pipeline_options(
        "DataflowRunner", 1, "--project=p --region=us-central1 --temp_location=gs://b/t", "gs://b/s"
    )
    assert options.get_all_options()["project"] == "p"


def test_damaged_store_object_is_named_with_its_repair_and_verify_finds_it(
    corpus, tok, prepared, tmp_path, capsys
):
    """A flipped byte, a truncation and a missing object each raise one line naming the object
    and the repair; `lmjax data verify` names the shard; the repair redoes only that shard."""
    import shutil

    directory = str(tmp_path / os.path.basename(prepared[0]))
    shutil.copytree(prepared[0], directory)
    victim = os.path.join(directory, store.shard_array("train", 0, 4), "c", "0")
    record = os.path.join(directory, store.shard_meta_file(0, 4))
    data = open(victim, "rb").read()
    assert cli.main(["data", "verify", directory]) == 0
    assert "all 4 shards sound" in capsys.readouterr().out
    for damaged, reason in [
        (data[:100] + bytes([data[100] ^ 1]) + data[101:], "Digest mismatch"),
        (data[: len(data) // 2], "Digest mismatch"),
        (None, "is missing"),
    ]:
        if damaged is None:
            os.remove(victim)
        else:
            open(victim, "wb").write(damaged)
        pipe = make_pipeline(text_cfg(corpus), tok, stores={"text": directory})
        with pytest.raises(FaultError) as caught:
            take(pipe, 0, 40)
        message = str(caught.value)
        assert "\n" not in message and reason in message
        assert message.startswith(f"store object {victim} (tokens [") and (
            f"delete {record} and run `lmjax data prepare`" in message
        )
        assert cli.main(["data", "verify", directory]) == 1
        out = capsys.readouterr().out
        assert out.startswith(f"shard 0: store object {victim}") and "1 of 4 shards damaged" in out
    os.remove(record)
    stamps = {
        i: os.stat(os.path.join(directory, store.shard_meta_file(i, 4))).st_mtime_ns
        for i in (1, 2, 3)
    }
    again, _ = prepare.prepare(text_cfg(corpus), tok, str(tmp_path))
    assert again == directory and open(victim, "rb").read() == data
    assert stamps == {
        i: os.stat(os.path.join(directory, store.shard_meta_file(i, 4))).st_mtime_ns
        for i in (1, 2, 3)
    }  # only shard 0 was redone
    same_store(directory, prepared[0])
    assert cli.main(["data", "verify", directory]) == 0


def test_the_delay_proxy_relays_gcs_requests_late_and_serves_loopback_only(
    gcs_bucket, gcs_server, monkeypatch
):
    from lmjax.tools import delay_proxy

    proxy = subprocess.Popen(
        [sys.executable, "-m", "lmjax.tools.delay_proxy"]
        + [f"--target=127.0.0.1:{gcs_server.port}", "--delay-ms=300"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = "http://" + proxy.stdout.readline().split()[-1]
        store.write_json(f"{gcs_bucket}/direct.json", {"a": 1})
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        start = time.perf_counter()
        assert store.read_json(f"{gcs_bucket}/direct.json") == {"a": 1}
        assert time.perf_counter() - start >= 0.3  # the request waited in the proxy
    finally:
        proxy.terminate()
        proxy.wait()
    with pytest.raises(SystemExit, match="loopback addresses only, not 10.0.0.1"):
        delay_proxy.main(["--target", "10.0.0.1:80"])


def test_a_run_finds_its_store_from_the_workdir_record_in_o1(corpus, tok, tmp_path, monkeypatch):
    """Process 0 resolves the store once and records it in the workdir; later starts and the
    other processes read the record without listing an input, so renamed or re-uploaded
    inputs never orphan the store; changed settings resolve again."""
    import shutil

    inputs = tmp_path / "inputs"
    shutil.copytree(corpus[0], inputs)
    cfg = text_cfg((str(inputs), corpus[1]), prepare_timeout_s=0.0)
    workdir = str(tmp_path / "run")
    stores = run_stores.run_stores(cfg, tok, workdir, leader=True)
    record = store.read_json(os.path.join(workdir, STORE_RECORD))
    assert record["stores"] == stores and store.open_store(stores["text"])
    for name in os.listdir(inputs):  # a re-upload: same bytes, new modification times
        (inputs / name).write_bytes((inputs / name).read_bytes())
    assert (
        run_stores.resolve_stores(cfg, tok, str(tmp_path / "run" / "data"), leader=False) == stores
    )
    (inputs / "a.txt").rename(inputs / "renamed.txt")

    def listed(*args, **kwargs):
        raise AssertionError("a start with a matching record listed the inputs")

    monkeypatch.setattr(sources, "input_shards", listed)
    for leader in (True, False):
        assert run_stores.run_stores(cfg, tok, workdir, leader=leader) == stores
    changed = dataclasses.replace(cfg, validation_fraction=0.3)
    with pytest.raises(ConfigError, match="waited 0 s for process 0 to prepare.*record"):
        run_stores.run_stores(changed, tok, workdir, leader=False)
    monkeypatch.undo()
    other = run_stores.run_stores(changed, tok, workdir, leader=True)
    assert other != stores
    assert run_stores.run_stores(changed, tok, workdir, leader=False) == other


def test_a_full_disk_during_preparation_is_one_line_and_leaves_no_partial_shard(
    tok, tmp_path, small_disk, monkeypatch
):
    cfg = _corpus_files(tmp_path / "corpus", 6)
    root = str((small_disk or tmp_path) / "stores")
    if small_disk is None:  # no tmpfs: the write itself reports ENOSPC
        import errno

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(store.TokenWriter, "close", full)
    else:  # fill the disk, leaving room for about one shard
        (small_disk / "ballast").write_bytes(
            b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - 40000)
        )
    with pytest.raises(FaultError, match=r"the disk under .* is full .* finished shards are kept"):
        prepare.prepare(cfg, tok, root)
    directory = sources.locate(cfg, tok, root)[0]
    names = {
        os.path.relpath(os.path.join(p, f), directory)
        for p, _, fs in os.walk(directory)
        for f in fs
    }
    done = {n[len("shard-") : len("shard-00000")] for n in names if n.startswith("shard-")}
    assert len(done) < 6 and store.META not in names
    assert all(n.startswith("shard-") or n.split("-")[1] in done for n in names), names


def test_permutation_is_a_keyed_bijection():
    for n in (1, 2, 3, 5, 17, 1000, 4097):
        p = shuffle.permute(np.arange(n), n, key=7)
        assert sorted(p) == list(range(n))
    p1, p2 = (shuffle.permute(np.arange(1000), 1000, key=k) for k in (1, 2))
    assert (p1 != np.arange(1000)).mean() > 0.9 and (p1 != p2).mean() > 0.9
    big = 10**12  # pointwise: no array of the domain's size
    x = shuffle.permute(np.array([0, 1, big - 1]), big, key=3)
    assert len(set(x)) == 3 and (x < big).all()


def test_batches_at_steps_0_1_and_10_to_the_7_equal_the_naive_reference(corpus, tok, prepared):
    stream = naive_streams(corpus, tok)["train"]
    pipe = make_pipeline(text_cfg(corpus), tok, stores={"text": prepared[0]})
    for step in (0, 1, 10**7):
        batch = pipe.train_batch(step)
        expected = naive_batch(stream, step, SEQ, BATCH, seed=3)
        np.testing.assert_array_equal(batch["inputs"], expected[:, :-1])
        np.testing.assert_array_equal(batch["targets"], expected[:, 1:])
        naive_pack_check(batch, tok.eos_id)
        assert all(batch[k].shape == (BATCH, SEQ) for k in BATCH_KEYS)
    assert_batches_equal(
        take(pipe, 10**7, 2), [pipe.train_batch(10**7), pipe.train_batch(10**7 + 1)]
    )
    after_eos = batch["inputs"][:, 1:][batch["inputs"][:, :-1] == tok.eos_id]
    assert (after_eos == tok.bos_id).all()  # every document starts with BOS


def test_each_epoch_is_every_window_once_in_a_fresh_order(corpus, tok, prepared):
    pipe = make_pipeline(text_cfg(corpus, batch_size=1), tok, stores={"text": prepared[0]})
    stream = naive_streams(corpus, tok)["train"]
    n = (len(stream) - 1) // SEQ
    epochs = [[pipe.train_batch(e * n + i)["inputs"][0] for i in range(n)] for e in range(2)]
    windows = sorted(tuple(stream[w * SEQ : (w + 1) * SEQ]) for w in range(n))
    assert sorted(map(tuple, epochs[0])) == windows == sorted(map(tuple, epochs[1]))
    assert [tuple(x) for x in epochs[0]] != [tuple(x) for x in epochs[1]]
    plain = make_pipeline(
        text_cfg(corpus, batch_size=1, shuffle=False), tok, stores={"text": prepared[0]}
    )
    np.testing.assert_array_equal(plain.train_batch(n + 2)["inputs"][0], stream[2 * SEQ : 3 * SEQ])


def test_any_process_count_sees_the_same_global_batches(corpus, tok, prepared):
    cfg = text_cfg(corpus)
    whole = [
        make_pipeline(cfg, tok, stores={"text": prepared[0]}).train_batch(s) for s in (0, 5, 10**6)
    ]
    for n in (2, 4):
        parts = [
            make_pipeline(cfg, tok, process_index=i, process_count=n, stores={"text": prepared[0]})
            for i in range(n)
        ]
        glued = [
            {k: np.concatenate([p.train_batch(s)[k] for p in parts]) for k in BATCH_KEYS}
            for s in (0, 5, 10**6)
        ]
        assert_batches_equal(glued, whole)
        assert parts[0].train_batch(0)["inputs"].shape == (BATCH // n, SEQ)
    # A process may feed any ascending set of global rows (the rows its devices hold).
    some = make_pipeline(cfg, tok, rows=[0, 3, 4, 7], stores={"text": prepared[0]})
    for k in BATCH_KEYS:
        np.testing.assert_array_equal(some.train_batch(5)[k], whole[1][k][[0, 3, 4, 7]])
        full = make_pipeline(cfg, tok, stores={"text": prepared[0]}).eval_batches(1)[0][k]
        np.testing.assert_array_equal(some.eval_batches(1)[0][k], full[[0, 3, 4, 7]])


def test_deterministic_given_seed_and_state_checks(corpus, tok, prepared, tmp_path):
    a = take(make_pipeline(text_cfg(corpus), tok, stores={"text": prepared[0]}), 0, 3)
    assert_batches_equal(
        a, take(make_pipeline(text_cfg(corpus), tok, stores={"text": prepared[0]}), 0, 3)
    )
    other = take(make_pipeline(text_cfg(corpus, seed=4), tok, stores={"text": prepared[0]}), 0, 1)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])
    pipe = make_pipeline(text_cfg(corpus), tok, stores={"text": prepared[0]})
    state = json.loads(json.dumps(pipe.state(12)))
    assert state["step"] == 12 and state["tokenizer"] == tok.fingerprint
    make_pipeline(
        text_cfg(corpus), tok, process_index=1, process_count=2, stores={"text": prepared[0]}
    ).check_state(state)
    with pytest.raises(DataStateError, match="seq_len: checkpoint 32, now 16"):
        make_pipeline(text_cfg(corpus, seq_len=16), tok, stores={"text": prepared[0]}).check_state(
            state
        )
    other_tok = load_tokenizer(train_tokenizer([SONNETS], 320, "bpe", str(tmp_path / "t")))
    with pytest.raises(ConfigError, match="tokenized with tokenizer"):
        make_pipeline(text_cfg(corpus), other_tok, stores={"text": prepared[0]})


def test_accepted_batch_size_and_seq_len_changes_carry_the_data_position_over(
    corpus, tok, prepared
):
    """A resume with another batch size reads on from the next unread window; one with another
    seq_len (unshuffled) from the next unread token, with nothing read twice or skipped."""
    stores = {"text": prepared[0]}
    old = make_pipeline(text_cfg(corpus, batch_size=4), tok, stores=stores)
    old.skipped = (1,)  # a batch the loss-spike guard skipped
    state = json.loads(json.dumps(old.state(3)))  # step 3 reads batch 4
    bigger = make_pipeline(text_cfg(corpus, batch_size=8), tok, stores=stores)
    with pytest.raises(DataStateError, match="accept_changes=data.FIELD"):
        bigger.check_state(state)
    bigger.check_state(state, accept=("data.batch_size",))
    for step, pair in ((3, (4, 5)), (4, (6, 7))):  # batch 8 rows = two old batches of 4 rows
        expected = np.concatenate([old.train_batch(p)["inputs"] for p in pair])
        np.testing.assert_array_equal(bigger.train_batch(bigger.position(step))["inputs"], expected)
    again = json.loads(json.dumps(bigger.state(9)))
    assert again["origin"] == {"position": 4, "window": 16}  # after batches 0-3 of 4 windows
    assert again["changes"] == [
        {"step": 3, "batch_size": [4, 8], "origin": {"position": 4, "window": 16}}
    ]
    resumed = make_pipeline(text_cfg(corpus, batch_size=8), tok, stores=stores)
    resumed.check_state(again, accept=("data.batch_size",))  # nothing changed: nothing new
    assert resumed.state(9) == again
    with pytest.raises(ValueError, match="precedes this run's data change"):
        resumed.train_batch(3)

    stream = naive_streams(corpus, tok)["train"]
    short = make_pipeline(text_cfg(corpus, batch_size=2, shuffle=False), tok, stores=stores)
    longer = make_pipeline(
        text_cfg(corpus, batch_size=2, seq_len=2 * SEQ, shuffle=False), tok, stores=stores
    )
    longer.check_state(short.state(3), accept=("data.seq_len",))
    assert longer.origin.window == 3  # 6 windows of 32 tokens read: 3 of 64
    rows = longer.train_batch(3)["inputs"]
    np.testing.assert_array_equal(rows.reshape(-1), stream[6 * SEQ : 10 * SEQ])
    np.testing.assert_array_equal(short.train_batch(2)["inputs"][1], stream[5 * SEQ : 6 * SEQ])


def test_eval_batches_score_each_validation_window_once_in_order(corpus, tok, prepared, caplog):
    pipe = make_pipeline(text_cfg(corpus), tok, stores={"text": prepared[0]})
    val = naive_streams(corpus, tok)["validation"]
    n_windows = (len(val) - 1) // SEQ
    assert BATCH < n_windows < 20 * BATCH and n_windows % BATCH
    with caplog.at_level("WARNING"):
        batches = pipe.eval_batches(20)  # more than the split holds
    assert len(batches) == -(-n_windows // BATCH)
    assert f"has {n_windows} windows, {len(batches)} batches" in caplog.text
    rows = {k: np.concatenate([b[k] for b in batches]) for k in BATCH_KEYS}
    scored = rows["loss_mask"].any(axis=1)
    assert scored.tolist() == [w < n_windows for w in range(len(scored))]
    for w in range(n_windows):
        np.testing.assert_array_equal(rows["inputs"][w], val[w * SEQ : w * SEQ + SEQ])
    # every target of windows 0..W-1 once, less those whose input is an EOS (another document)
    inputs = val[: n_windows * SEQ]
    assert rows["loss_mask"].sum() == inputs.size - np.count_nonzero(inputs == tok.eos_id)
    assert_batches_equal(batches[:2], pipe.eval_batches(2))
    seeded = make_pipeline(text_cfg(corpus, seed=9), tok, stores={"text": prepared[0]})
    assert_batches_equal(batches, seeded.eval_batches(20))


def test_concatenate_and_split_without_packing(corpus, tok, prepared):
    packed = make_pipeline(text_cfg(corpus), tok, stores={"text": prepared[0]}).train_batch(5)
    plain = make_pipeline(
        text_cfg(corpus, packing=False), tok, stores={"text": prepared[0]}
    ).train_batch(5)
    np.testing.assert_array_equal(packed["inputs"], plain["inputs"])
    assert (plain["segment_ids"] == 1).all() and (plain["loss_mask"] == 1).all()
    np.testing.assert_array_equal(plain["positions"], np.broadcast_to(np.arange(SEQ), (BATCH, SEQ)))


def test_followers_wait_for_the_leaders_store_and_time_out_clearly(corpus, tok, tmp_path):
    cfg = text_cfg(corpus, prepare_timeout_s=60.0)
    root = str(tmp_path / "stores")
    found = []
    follower = threading.Thread(
        target=lambda: found.append(run_stores.ensure_store(cfg, tok, root, leader=False))
    )
    follower.start()
    time.sleep(0.5)
    assert follower.is_alive() and not found  # waiting, not preparing
    leader = run_stores.ensure_store(cfg, tok, root, leader=True)
    follower.join(timeout=30)
    assert found == [leader] and store.open_store(leader)
    with pytest.raises(ConfigError, match="waited 0 s for process 0 to prepare.*prepare_timeout_s"):
        run_stores.ensure_store(
            text_cfg(corpus, seed=1, validation_fraction=0.3, prepare_timeout_s=0.0),
            tok,
            root,
            leader=False,
        )
    with pytest.raises(ConfigError, match="waited 0 s for process 0 to train the tokenizer"):
        prepare_tokenizer(
            cfg.__class__(source="packaged", prepare_timeout_s=0.0),
            str(tmp_path / "w"),
            leader=False,
        )


def test_clear_errors_before_work(corpus, tok, tmp_path):
    with pytest.raises(ConfigError, match="matched no files"):
        prepare.prepare(
            text_cfg(corpus, text_files=str(tmp_path / "none/*.txt")), tok, str(tmp_path)
        )
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="data.text_feature"):
        prepare.prepare(text_cfg(corpus, text_files=str(bad)), tok, str(tmp_path))
    with pytest.raises(ConfigError, match="unknown TFDS dataset"):
        prepare.prepare(
            text_cfg(corpus, source="tfds", tfds_name="no_such_dataset_xyz"), tok, str(tmp_path)
        )
    with pytest.raises(ConfigError, match="divisible"):
        make_pipeline(text_cfg(corpus), tok, process_count=3)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        make_pipeline(text_cfg(corpus), None)
    with pytest.raises(ConfigError, match="no prepared store"):
        make_pipeline(text_cfg(corpus), tok, stores={"text": str(tmp_path)})


def test_synthetic_source():
    cfg = DataConfig(source="synthetic", seq_len=SEQ, batch_size=BATCH, seed=1)
    whole = take(make_pipeline(cfg, None, vocab_size=50), 0, 4)
    assert all(b["inputs"].max() < 50 for b in whole)
    assert_batches_equal(take(make_pipeline(cfg, None, vocab_size=50), 2, 2), whole[2:])
    half = take(make_pipeline(cfg, None, vocab_size=50, process_index=1, process_count=2), 2, 2)
    assert_batches_equal(half, [{k: b[k][BATCH // 2 :] for k in BATCH_KEYS} for b in whole[2:]])
    for b in whole:
        naive_pack_check(b, eos=-1)
    with pytest.raises(ConfigError, match="vocab_size"):
        make_pipeline(cfg, None)
    # an accepted batch-size and seq_len change reads windows never read before
    old = make_pipeline(dataclasses.replace(cfg, batch_size=4), None, vocab_size=50)
    seen = {tuple(row[:SEQ]) for b in take(old, 0, 8) for row in b["inputs"]}
    new = make_pipeline(dataclasses.replace(cfg, seq_len=2 * SEQ), None, vocab_size=50)
    new.check_state(old.state(4), accept=("data.batch_size", "data.seq_len"))
    rows = [tuple(row[:SEQ]) for b in take(new, 4, 2) for row in b["inputs"]]
    assert len(set(rows)) == len(rows) and not seen & set(rows)


def test_preview_prepare_and_bench_commands(corpus, tok, capsys, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    config = Config(data=text_cfg(corpus))
    experiment = tmp_path / "exp.py"
    experiment.write_text(
        f"from lmjax.config import *\ndef config():\n    return Config(data={config.data!r})\n"
    )
    base = ["--experiment", str(experiment), "--workdir", str(workdir)]
    assert cli.main(["data", "prepare", *base]) == 0
    out = capsys.readouterr().out
    assert "4 shards, 60 documents" in out and "2 empty documents, 1 empty files" in out
    assert cli.main(["data", "preview", *base, "--start-step", "2", "--batches", "2"]) == 0
    whole = capsys.readouterr().out.splitlines()
    assert (
        cli.main(
            [
                "data",
                "preview",
                *base,
                "--start-step",
                "3",
                "--batches",
                "1",
                "--process-index",
                "1",
                "--process-count",
                "2",
            ]
        )
        == 0
    )
    half = capsys.readouterr().out.splitlines()
    assert half[0] == "process 1 of 2: global rows [4, 8)"
    # step 3's line, then its rows 4..7 exactly as the whole batch shows them
    step3 = whole.index(next(line for line in whole if line.split()[:1] == ["3"] and "%" in line))
    assert half[2].split()[0] == "3" and half[3:] == whole[step3 + 5 : step3 + 9]
    assert "text" in half[3]
    rate = bench_command.data(config, str(workdir), seconds=0.2)
    assert rate > 0 and "tokens/s" in capsys.readouterr().out


def test_import_lmjax_data_does_not_import_tensorflow():
    code = (
        "import sys, lmjax, lmjax.data; "
        "print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_closing_the_training_iterator_stops_its_prefetch_thread(corpus, tok, prepared):
    """Batches are made ahead in a background thread; the trainer drops its iterator at every
    return (end of run, signal, error), which must end that thread."""

    def data_threads():
        return [t for t in threading.enumerate() if t.name.startswith("lmjax-data")]

    pipe = make_pipeline(text_cfg(corpus), tok, stores={"text": prepared[0]})
    it = pipe.train_batches(3)
    first = next(it)
    assert len(data_threads()) == 1
    it.close()
    assert data_threads() == []
    assert_batches_equal([first], [pipe.train_batch(3)])


def test_a_registered_tfds_dataset_goes_through_prepare(tok, tmp_path):
    """Any registered TFDS dataset with a text feature: its train and eval splits become the
    store's splits, in the dataset's order."""
    import tensorflow_datasets as tfds

    sonnets = documents.split_text(open(SONNETS).read())[1:41]

    class LmjaxTestSonnets(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({"body": tfds.features.Text()})
            )

        def _split_generators(self, dl_manager):
            return {
                "train": self._generate_examples(sonnets[:30]),
                "test": self._generate_examples(sonnets[30:]),
            }

        def _generate_examples(self, texts):
            for i, text in enumerate(texts):
                yield i, {"body": text}

    LmjaxTestSonnets(data_dir=str(tmp_path)).download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
    cfg = DataConfig(
        source="tfds",
        tfds_name="lmjax_test_sonnets",
        data_dir=str(tmp_path),
        text_feature="body",
        eval_split="test",
        seq_len=SEQ,
        batch_size=BATCH,
    )
    directory, meta = prepare.prepare(cfg, tok, str(tmp_path / "stores"))
    for split, texts in (("train", sonnets[:30]), ("validation", sonnets[30:])):
        order = [
            t.decode()
            for t in sources.tfds_texts(
                "lmjax_test_sonnets", str(tmp_path), "train" if split == "train" else "test", "body"
            )
        ]
        assert sorted(order) == sorted(texts)
        expected = [x for ids in tok.encode_documents(order) for x in ids]
        np.testing.assert_array_equal(stream_of(directory, meta, split), expected)
    with pytest.raises(ConfigError, match="no feature data.text_feature='text'"):
        prepare.prepare(dataclasses.replace(cfg, text_feature="text"), tok, str(tmp_path))
    with pytest.raises(ConfigError, match="no split 'validation'"):
        prepare.prepare(dataclasses.replace(cfg, eval_split="validation"), tok, str(tmp_path))


def test_mixture_rows_follow_the_weights_and_each_source_walks_its_own_rows():
    from lmjax.data import mixture

    weights = [w for _, w in mixture.parse("web:0.7,code:0.2,books:0.1")]
    assert weights == pytest.approx([0.7, 0.2, 0.1])
    quota = mixture.quotas(weights)
    rows = np.arange(1000 * BATCH)  # 1,000 steps
    source, index = mixture.assign(5, rows, quota)
    for k, w in enumerate(weights):
        mine = index[source == k]
        assert abs(len(mine) / len(rows) - w) < 0.01
        np.testing.assert_array_equal(mine, np.arange(len(mine)))  # consecutive, none skipped
    # A pure function of (seed, row): any subset, in any call, gives the same answer.
    some = np.array([3, 700, 5000, 10**9])
    far = mixture.assign(5, some, quota)
    np.testing.assert_array_equal(far[0][:3], source[some[:3]])
    np.testing.assert_array_equal(far[1][:3], index[some[:3]])
    assert not np.array_equal(mixture.assign(6, rows[:512], quota)[0], source[:512])
    for bad in ("web", "web:0", "web:x", "a:1,a:2"):
        with pytest.raises(ConfigError, match="data.mixture"):
            mixture.parse(bad)
    with pytest.raises(ConfigError, match="below 1/512"):
        mixture.quotas([0.9999, 0.0001])


def test_mixture_pipeline_reads_each_source_by_its_own_windows(corpus, tok, prepared, tmp_path):
    root = os.path.dirname(prepared[0])
    other = _corpus_files(tmp_path / "other", 4)
    prepare.prepare(dataclasses.replace(other, name="plays"), tok, root)
    cfg = text_cfg(corpus, mixture="text:0.75,plays:0.25", tokenizer=tok.path, store_dir=root)
    stores = run_stores.resolve_stores(cfg, tok, root, leader=False)
    assert stores["text"] == prepared[0] and os.path.basename(stores["plays"]).startswith("plays-")
    pipe = make_pipeline(cfg, tok, stores=stores)
    from lmjax.data import mixture, pipeline

    quota = mixture.quotas([0.75, 0.25])
    # each source alone: its windows by the single-source rule, keyed by (seed, source number)
    alone = [
        pipeline.WindowReader(
            store.StoreSplit(stores[n], "train", store.open_store(stores[n])),
            seq_len=SEQ,
            shuffle_key=(3, k),
        )
        for k, n in enumerate(stores)
    ]
    text_alone = make_pipeline(text_cfg(corpus, batch_size=1), tok, stores={"text": stores["text"]})
    for step in (0, 10**6):
        batch, names = pipe.train_batch(step), pipe.row_sources(step)
        source, index = mixture.assign(3, step * BATCH + np.arange(BATCH), quota)
        assert names == [["text", "plays"][k] for k in source] and set(names) == {"text", "plays"}
        for r in range(BATCH):
            expected = alone[source[r]].tokens(index[r : r + 1])[0]
            np.testing.assert_array_equal(batch["inputs"][r], expected[:-1])
            if source[r] == 0:  # the first source's rows are a single-source run's rows
                np.testing.assert_array_equal(
                    batch["inputs"][r], text_alone.train_batch(int(index[r]))["inputs"][0]
                )
        naive_pack_check(batch, tok.eos_id)
    singles = {n: make_pipeline(text_cfg(corpus), tok, stores={n: d}) for n, d in stores.items()}
    sets = pipe.eval_sets(1)
    assert list(sets) == ["text", "plays"]
    assert_batches_equal(sets["plays"], singles["plays"].eval_batches(1))
    assert pipe.state(0)["stores"] == {n: os.path.basename(d) for n, d in stores.items()}
    with pytest.raises(ConfigError, match="holds no prepared store named 'web'.*data.name=web"):
        run_stores.resolve_stores(text_cfg(corpus, mixture="web:1"), tok, root, leader=False)
