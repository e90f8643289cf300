"""The data pipeline on real TFDS shards and real tf.data, checked against naive references."""
import dataclasses
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lmjax import cli
from lmjax.config import Config, ConfigError, DataConfig
from lmjax.data import BATCH_KEYS, DataStateError, documents, load_tokenizer, make_pipeline, train_tokenizer
from lmjax.data import text_builder, tools
from lmjax.data.packing import TokenStore

SONNETS = os.path.join(documents.PACKAGED_DIR, "sonnets.txt")
SEQ, BATCH = 32, 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "sonnets"
    return load_tokenizer(train_tokenizer([SONNETS], 384, "bpe", str(prefix)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """60 sonnets as documents: 36 in a form-feed separated .txt, 24 in a .jsonl."""
    root = tmp_path_factory.mktemp("corpus")
    sonnets = documents.split_text(open(SONNETS).read())[1:61]
    (root / "a.txt").write_text("\f\n".join(sonnets[:36]))
    with open(root / "b.jsonl", "w") as f:
        for s in sonnets[36:]:
            f.write(json.dumps({"text": s}) + "\n")
    return str(root), sonnets


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shards"))


def text_cfg(corpus, shards, **kw):
    base = DataConfig(source="text", text_files=corpus[0], data_dir=shards, seq_len=SEQ,
                      batch_size=BATCH, validation_fraction=0.1, seed=3)
    return dataclasses.replace(base, **kw)


def split_docs(shards_dir, config_name, split):
    builder = tfds.builder(f"lmjax_text/{config_name}", data_dir=shards_dir)
    return [t.decode() for t in builder.as_dataset(split=split).map(lambda e: e["text"]).as_numpy_iterator()]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(BATCH_KEYS)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def take(pipeline, start, n):
    return list(itertools.islice(pipeline.train_batches(start), n))


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
            assert mask[t] == (0.0 if inp[t] == eos else 1.0)  # an EOS has no target in its document


def stream_of(batches_per_step):
    """Concatenates window inputs in stream order: rows of step 0, then step 1, ..."""
    return np.concatenate([b["inputs"].reshape(-1) for b in batches_per_step])


def docs_in(stream, tok, count):
    """The first `count` documents of a token stream, decoded."""
    ends = np.flatnonzero(stream == tok.eos_id)[:count]
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(stream[s:e]) for s, e in zip(starts, ends)]


# ---------------------------------------------------------------- builder


def test_builder_writes_tfds_shards_split_by_document(corpus, shards, tmp_path):
    files = documents.expand_files(corpus[0])
    builder = text_builder.prepare_text_dataset(files, label="text", text_key="text",
                                                validation_fraction=0.1, data_dir=shards)
    assert builder.is_prepared() and os.listdir(builder.data_dir)
    name = builder.builder_config.name
    train, val = split_docs(shards, name, "train"), split_docs(shards, name, "validation")
    assert sorted(train + val) == sorted(corpus[1])  # disjoint and complete
    held, total = sum(map(len, val)), sum(map(len, corpus[1]))
    assert held >= 0.1 * total > held - max(map(len, val))  # a tenth of the text, by document
    # Another directory, same files: the same documents are held out (the split is by content).
    again = text_builder.prepare_text_dataset(files, label="text", text_key="text",
                                              validation_fraction=0.1, data_dir=str(tmp_path))
    assert sorted(split_docs(str(tmp_path), again.builder_config.name, "validation")) == sorted(val)


def test_validation_selection_edge_cases():
    sizes = {f"f:{i}": 10 for i in range(5)}
    assert text_builder.validation_keys(sizes, 0.0) == set()
    assert len(text_builder.validation_keys(sizes, 0.01)) == 1
    assert len(text_builder.validation_keys(sizes, 0.5)) == 3
    with pytest.raises(ConfigError, match="nothing is left for training"):
        text_builder.validation_keys({"f:0": 10}, 0.05)


def test_packaged_corpus_has_many_documents():
    files = documents.packaged_files()
    docs = [d for f in files for d in documents.read_documents(f)]
    assert len(files) == 8 and len(docs) == 285
    assert 0.9e6 < sum(os.path.getsize(f) for f in files) < 1.1e6
    assert "Open Knowledge Foundation" in open(os.path.join(documents.PACKAGED_DIR, "README.md")).read()


# ---------------------------------------------------------------- indexed pipeline (text/packaged)


def test_packing_segments_positions_targets_against_naive_loop(corpus, shards, tok):
    pipe = make_pipeline(text_cfg(corpus, shards), tok)
    batches = take(pipe, 0, 6)
    inputs = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
    after_eos = inputs[1:][inputs[:-1] == tok.eos_id]
    assert len(after_eos) and (after_eos == tok.bos_id).all()  # every document starts with BOS
    for b in batches:
        assert all(b[k].shape == (BATCH, SEQ) for k in BATCH_KEYS)
        assert b["inputs"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
        naive_pack_check(b, tok.eos_id)
    # A window's last target is the next window's first input: nothing is lost at window edges.
    flat = [(b["inputs"][r], b["targets"][r]) for b in batches for r in range(BATCH)]
    for (_, tgt), (nxt, _) in zip(flat, flat[1:]):
        assert tgt[-1] == nxt[0]


def test_one_epoch_is_the_whole_train_split_once(corpus, shards, tok):
    cfg = text_cfg(corpus, shards)
    pipe = make_pipeline(cfg, tok)
    name = pipe.state(0)["dataset"].split("/")[1].split(":")[0]
    train = split_docs(shards, name, "train")
    tokens = sum(len(tok.encode(d)) + 2 for d in train)
    steps = tokens // (BATCH * SEQ) + 2
    # Union over two processes' slices, reassembled in global order.
    halves = [take(make_pipeline(cfg, tok, process_index=i, process_count=2), 0, steps) for i in range(2)]
    glued = [{k: np.concatenate([h0[k], h1[k]]) for k in BATCH_KEYS} for h0, h1 in zip(*halves)]
    epoch = docs_in(stream_of(glued), tok, len(train))
    assert sorted(epoch) == sorted(train)  # every train document exactly once, nothing else
    assert epoch != train  # shuffled
    padding = sum((b["segment_ids"] == 0).sum() for b in glued)
    assert padding == 0


def test_process_slices_are_rows_of_the_global_batch(corpus, shards, tok):
    cfg = text_cfg(corpus, shards)
    whole = take(make_pipeline(cfg, tok), 0, 3)
    for n in (2, 4):
        parts = [take(make_pipeline(cfg, tok, process_index=i, process_count=n), 0, 3) for i in range(n)]
        glued = [{k: np.concatenate([p[s][k] for p in parts]) for k in BATCH_KEYS} for s in range(3)]
        assert_batches_equal(glued, whole)
        assert all(p[0]["inputs"].shape == (BATCH // n, SEQ) for p in parts)


def test_resume_at_any_step_equals_uninterrupted_run(corpus, shards, tok):
    cfg = text_cfg(corpus, shards)
    pipe = make_pipeline(cfg, tok)
    k = 37  # past the end of the first epoch
    reference = take(pipe, 0, k + 3)[k:]
    assert_batches_equal(take(make_pipeline(cfg, tok), k, 3), reference)
    # ... also after a change of process count: process 1 of 2 resumes with its half of the rows.
    half = take(make_pipeline(cfg, tok, process_index=1, process_count=2), k, 3)
    assert_batches_equal(half, [{key: b[key][BATCH // 2:] for key in BATCH_KEYS} for b in reference])


def test_deterministic_given_seed(corpus, shards, tok):
    a = take(make_pipeline(text_cfg(corpus, shards), tok), 0, 3)
    assert_batches_equal(a, take(make_pipeline(text_cfg(corpus, shards), tok), 0, 3))
    other = take(make_pipeline(text_cfg(corpus, shards, seed=4), tok), 0, 3)
    assert not np.array_equal(a[0]["inputs"], other[0]["inputs"])


def test_eval_split_is_fixed_and_held_out(corpus, shards, tok):
    pipe = make_pipeline(text_cfg(corpus, shards), tok)
    first = pipe.eval_batches(3)
    assert_batches_equal(first, pipe.eval_batches(3))
    assert_batches_equal(first, make_pipeline(text_cfg(corpus, shards, seed=9), tok).eval_batches(3))
    name = pipe.state(0)["dataset"].split("/")[1].split(":")[0]
    val = split_docs(shards, name, "validation")
    stream = stream_of(first)
    seen = docs_in(stream, tok, int((stream == tok.eos_id).sum()))
    assert seen and seen == val[:len(seen)]  # canonical order of the validation split, not shuffled


def test_concatenate_and_split_without_packing(corpus, shards, tok):
    packed = take(make_pipeline(text_cfg(corpus, shards), tok), 5, 2)
    plain = take(make_pipeline(text_cfg(corpus, shards, packing=False), tok), 5, 2)
    for p, q in zip(packed, plain):
        np.testing.assert_array_equal(p["inputs"], q["inputs"])
        np.testing.assert_array_equal(p["targets"], q["targets"])
        assert (q["segment_ids"] == 1).all() and (q["loss_mask"] == 1).all()
        np.testing.assert_array_equal(q["positions"], np.broadcast_to(np.arange(SEQ), (BATCH, SEQ)))


def test_state_round_trips_and_refuses_a_different_pipeline(corpus, shards, tok, tmp_path):
    pipe = make_pipeline(text_cfg(corpus, shards), tok)
    state = json.loads(json.dumps(pipe.state(12)))
    assert state["step"] == 12 and state["tokenizer"] == tok.fingerprint
    pipe.check_state(state)
    make_pipeline(text_cfg(corpus, shards), tok, process_index=1, process_count=2).check_state(state)
    with pytest.raises(DataStateError, match="seq_len: checkpoint 32, now 16"):
        make_pipeline(text_cfg(corpus, shards, seq_len=16), tok).check_state(state)
    other_tok = load_tokenizer(train_tokenizer([SONNETS], 320, "bpe", str(tmp_path / "t")))
    with pytest.raises(DataStateError, match="tokenizer"):
        make_pipeline(text_cfg(corpus, shards), other_tok).check_state(state)


def test_window_store_against_naive_stream():
    # Three tiny documents; the reference builds the epoch streams by concatenation.
    docs = [np.array([5, 6, 2]), np.array([7, 2]), np.array([8, 9, 10, 2])]
    starts = np.cumsum([0] + [len(d) for d in docs])
    store = TokenStore(np.concatenate(docs), starts, shuffle=True, seed=1)
    stream = np.concatenate([np.concatenate([docs[i] for i in store.epoch_order(e)[0]]) for e in range(6)])
    tokens, _ = store.windows(0, 12, 4)
    for w in range(12):
        np.testing.assert_array_equal(tokens[w], stream[w * 4:w * 4 + 5])


# ---------------------------------------------------------------- registered TFDS source (streaming)


def tfds_cfg(corpus, shards, tok_name, **kw):
    return dataclasses.replace(text_cfg(corpus, shards), source="tfds", tfds_name=tok_name,
                               shuffle_buffer=16, **kw)


@pytest.fixture(scope="module")
def tfds_name(corpus, shards, tok):
    # The local builder's shards, opened by name like any registered TFDS dataset.
    return make_pipeline(text_cfg(corpus, shards), tok).state(0)["dataset"]


def test_tfds_stream_deterministic_resumable_and_packed(corpus, shards, tok, tfds_name):
    cfg = tfds_cfg(corpus, shards, tfds_name)
    pipe = make_pipeline(cfg, tok)
    run = take(pipe, 0, 8)
    assert_batches_equal(run, take(make_pipeline(cfg, tok), 0, 8))
    assert_batches_equal(take(make_pipeline(cfg, tok), 5, 3), run[5:])
    for b in run:
        naive_pack_check(b, tok.eos_id)
    assert_batches_equal(pipe.eval_batches(2), pipe.eval_batches(2))
    state = pipe.state(5)
    with pytest.raises(DataStateError, match="same number of processes|resume on 1 process"):
        make_pipeline(cfg, tok, process_index=0, process_count=2).check_state(state)


def test_tfds_stream_process_parts_are_disjoint_and_complete(corpus, shards, tok, tfds_name):
    cfg = tfds_cfg(corpus, shards, tfds_name, shuffle=False)
    builder = tfds.builder(tfds_name, data_dir=shards)
    train = split_docs(shards, builder.builder_config.name, "train")
    seen = []
    for i, part in enumerate(tfds.even_splits("train", n=2)):
        mine = [t.decode() for t in builder.as_dataset(split=part).map(lambda e: e["text"]).as_numpy_iterator()]
        steps = sum(len(tok.encode(d)) + 2 for d in mine) // (BATCH // 2 * SEQ) + 1
        batches = take(make_pipeline(cfg, tok, process_index=i, process_count=2), 0, steps)
        seen += docs_in(stream_of(batches), tok, len(mine))
    assert sorted(seen) == sorted(train)  # disjoint, and together the whole split


# ---------------------------------------------------------------- errors before training


def test_clear_errors_before_training(corpus, shards, tok, tfds_name, tmp_path):
    with pytest.raises(ConfigError, match="matched no files"):
        make_pipeline(text_cfg(corpus, shards, text_files=str(tmp_path / "none/*.txt")), tok)
    with pytest.raises(ConfigError, match="unknown TFDS dataset"):
        make_pipeline(tfds_cfg(corpus, shards, "no_such_dataset_xyz"), tok)
    with pytest.raises(ConfigError, match="no feature data.text_feature='content'.*'id', 'text'"):
        make_pipeline(tfds_cfg(corpus, shards, tfds_name, text_feature="content"), tok)
    with pytest.raises(ConfigError, match="no split 'test'"):
        make_pipeline(tfds_cfg(corpus, shards, tfds_name, eval_split="test"), tok)
    with pytest.raises(ConfigError, match="not prepared"):
        make_pipeline(tfds_cfg(corpus, str(tmp_path), "lm1b"), tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match="data.text_feature"):
        make_pipeline(text_cfg(corpus, shards, text_files=str(bad)), tok)
    with pytest.raises(ConfigError, match="divisible"):
        make_pipeline(text_cfg(corpus, shards), tok, process_count=3)
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        make_pipeline(text_cfg(corpus, shards), None)


# ---------------------------------------------------------------- synthetic, tools, import cost


def test_synthetic_source():
    cfg = DataConfig(source="synthetic", seq_len=SEQ, batch_size=BATCH, seed=1)
    whole = take(make_pipeline(cfg, None, vocab_size=50), 0, 4)
    assert all(b["inputs"].max() < 50 for b in whole)
    assert_batches_equal(take(make_pipeline(cfg, None, vocab_size=50), 2, 2), whole[2:])
    half = take(make_pipeline(cfg, None, vocab_size=50, process_index=1, process_count=2), 2, 2)
    assert_batches_equal(half, [{k: b[k][BATCH // 2:] for k in BATCH_KEYS} for b in whole[2:]])
    for b in whole:
        naive_pack_check(b, eos=-1)
    with pytest.raises(ConfigError, match="vocab_size"):
        make_pipeline(cfg, None)


def test_preview_and_bench_print(corpus, shards, tok, capsys, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(tok.path, "rb") as src:
        (workdir / "tokenizer.model").write_bytes(src.read())
    config = Config(data=text_cfg(corpus, shards))
    tools.preview(config, str(workdir), start_step=0, batches=4)
    lines = capsys.readouterr().out.strip().splitlines()
    experiment = tmp_path / "exp.py"
    experiment.write_text("from lmjax.config import *\n"
                          f"def config():\n    return Config(data={config.data!r})\n")
    assert cli.main(["data", "preview", "--experiment", str(experiment), "--workdir", str(workdir),
                     "--start-step", "2", "--batches", "2"]) == 0
    resumed = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and resumed[1:] == lines[3:]  # same step, same hash
    step, digest = lines[3].split()[:2]
    assert step == "2" and len(digest) == 12
    rate = tools.bench(config, str(workdir), seconds=0.2)
    assert rate > 0 and "tokens/s" in capsys.readouterr().out


def test_import_lmjax_data_does_not_import_tensorflow():
    code = ("import sys, lmjax, lmjax.data; "
            "print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]



def test_closing_the_training_iterator_stops_its_prefetch_thread(corpus, shards, tok, tfds_name):
    """Batches are made ahead in a background thread; the trainer drops its iterator at every
    return (end of run, signal, error), which must end that thread, for both producers."""
    import threading

    def data_threads():
        return [t for t in threading.enumerate() if t.name.startswith("lmjax-data")]

    for cfg in (text_cfg(corpus, shards), tfds_cfg(corpus, shards, tfds_name)):
        pipe = make_pipeline(cfg, tok)
        it = pipe.train_batches(3)
        first = next(it)
        assert len(data_threads()) == 1
        it.close()
        assert data_threads() == []
        assert_batches_equal([first], take(pipe, 3, 1))
