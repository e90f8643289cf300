"""Tokenizers of both kinds (SentencePiece, Hugging Face tokenizer.json): training (seeded),
loading (local and from the tests' GCS server), special tokens, round trips, identity."""

import json
import os

import numpy as np
import pytest

from lmjax.config import ConfigError, DataConfig
from lmjax.data import documents
from lmjax.data.prepare import prepare_tokenizer
from lmjax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    HFTokenizer,
    from_serialized,
    load_tokenizer,
    train_tokenizer,
)

SONNETS = os.path.join(documents.PACKAGED_DIR, "sonnets.txt")


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    return train_tokenizer([SONNETS], 384, "bpe", str(tmp_path_factory.mktemp("tok") / "sonnets"))


def test_round_trip_keeps_newlines_spaces_and_unicode(bpe_path):
    tok = load_tokenizer(bpe_path)
    text = open(SONNETS).read()[:2000] + "\n\n  two  spaces\ttab, ünïcödé ✓ 12345\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert max(ids) < tok.vocab_size == 384
    # Byte fallback: characters never seen in training become byte pieces, not <unk>.
    assert 3 not in tok.encode("✓ ü")


def test_special_ids_and_fingerprint(bpe_path, tmp_path):
    tok = load_tokenizer(bpe_path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tok.fingerprint) == 12 and load_tokenizer(bpe_path).fingerprint == tok.fingerprint
    assert os.path.exists(bpe_path[: -len(".model")] + ".vocab")
    other = train_tokenizer([SONNETS], 320, "bpe", str(tmp_path / "other"))
    assert load_tokenizer(other).fingerprint != tok.fingerprint


def test_unigram_from_jsonl_glob_with_text_key(tmp_path):
    docs = open(SONNETS).read().split("\f")
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"body": d}) + "\n")
    path = train_tokenizer(
        str(tmp_path / "*.jsonl"), 320, "unigram", str(tmp_path / "uni"), text_key="body"
    )
    tok = load_tokenizer(path)
    assert tok.vocab_size == 320 and tok.decode(tok.encode(docs[5])) == docs[5]
    with pytest.raises(ConfigError, match="text_feature"):
        train_tokenizer(str(tmp_path / "a.jsonl"), 320, "unigram", str(tmp_path / "x"))


def test_cli_tokenizer_train(tmp_path, capsys):
    from lmjax import cli

    assert (
        cli.main(
            [
                "tokenizer",
                "train",
                "--input",
                SONNETS,
                "--vocab-size",
                "320",
                "--model-type",
                "bpe",
                "--output",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    tok = load_tokenizer(str(tmp_path / "cli.model"))
    assert f"fingerprint={tok.fingerprint}" in capsys.readouterr().out


def test_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(ConfigError, match="matched no files"):
        train_tokenizer([str(tmp_path / "nothing*.txt")], 320, "bpe", str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="model type"):
        train_tokenizer([SONNETS], 320, "wordpiece", str(tmp_path / "t"))


def test_prepare_tokenizer_trains_once_into_workdir(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(SONNETS).read())
    cfg = DataConfig(source="text", text_files=str(corpus), tokenizer_vocab_size=320)
    workdir = str(tmp_path / "run")
    tok = prepare_tokenizer(cfg, workdir)
    model = os.path.join(workdir, "tokenizer.model")
    assert tok.vocab_size == 320 and tok.path == model
    stamp = os.stat(model).st_mtime_ns
    assert prepare_tokenizer(cfg, workdir).fingerprint == tok.fingerprint
    assert os.stat(model).st_mtime_ns == stamp  # reused, not retrained
    assert prepare_tokenizer(DataConfig(source="synthetic"), workdir) is None
    assert prepare_tokenizer(DataConfig(tokenizer=model), "").fingerprint == tok.fingerprint


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("hf") / "tokenizer")
    return train_tokenizer([SONNETS], 400, "bpe", prefix, kind="tokenizers")


def test_tokenizer_json_round_trip_specials_and_fingerprint(hf_path, bpe_path, tmp_path):
    tok = load_tokenizer(hf_path)
    assert isinstance(tok, HFTokenizer) and hf_path.endswith("tokenizer.json")
    text = open(SONNETS).read()[:2000] + "\n\n  two  spaces\ttab, ünïcödé ✓ 12345\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < tok.vocab_size == 400
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    docs = ["Shall I compare thee", "to a summer's day?"]
    assert tok.encode_documents(docs) == [[BOS_ID, *tok.encode(d), EOS_ID] for d in docs]
    assert tok.encode_documents(docs[:1], eos=False) == [[BOS_ID, *tok.encode(docs[0])]]
    assert tok.decode(tok.encode_documents(docs[:1])[0]) == docs[0]  # specials are dropped
    # Identity: the file's bytes. Training is deterministic; another tokenizer differs.
    again = train_tokenizer([SONNETS], 400, "bpe", str(tmp_path / "again"), kind="tokenizers")
    assert open(again, "rb").read() == open(hf_path, "rb").read()
    assert (
        load_tokenizer(again).fingerprint == tok.fingerprint != load_tokenizer(bpe_path).fingerprint
    )
    # Workers rebuild it from its bytes.
    assert from_serialized(tok.serialized).encode(text) == ids


def _published_style(tmp_path, specials: list[str]) -> str:
    """A byte-level BPE tokenizer.json with the special tokens of a published family."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator([open(SONNETS).read()[:5000]], trainer)
    tk.add_special_tokens(specials)
    path = tmp_path / f"{len(specials)}" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(tk.to_str())
    return str(path)


def test_published_tokenizer_json_specials_name_bos_eos_and_pad(tmp_path):
    # Llama 3: BOS and EOS by name, no pad (EOS pads); the vocabulary counts added tokens.
    llama = load_tokenizer(
        _published_style(tmp_path, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    )
    assert (llama.bos_id, llama.eos_id, llama.pad_id) == (300, 301, 301)
    assert llama.vocab_size == 303
    assert llama.encode_documents(["hi"]) == [[300, *llama.encode("hi"), 301]]
    # Qwen / GPT-2: one end-of-text token, no BOS: documents start without one.
    qwen = load_tokenizer(_published_style(tmp_path, ["<|endoftext|>", "<|im_start|>"]))
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (-1, 300, 300)
    assert qwen.encode_documents(["hi"]) == [[*qwen.encode("hi"), 300]]
    with pytest.raises(ConfigError, match="has no EOS token"):
        load_tokenizer(_published_style(tmp_path, ["<|im_start|>"]))
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError, match="is not a Hugging Face tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_tokenizer_json_through_cli_gcs_and_run_config(hf_path, tmp_path, capsys, gcs_bucket):
    from lmjax import cli, storage

    out = str(tmp_path / "cli")
    argv = ["tokenizer", "train", "--input", SONNETS, "--vocab-size", "320", "--output", out]
    assert cli.main(argv + ["--kind", "tokenizers"]) == 0
    tok = load_tokenizer(out + ".json")
    assert f"fingerprint={tok.fingerprint}" in capsys.readouterr().out and tok.vocab_size == 320
    with pytest.raises(ConfigError, match="byte-level BPE"):
        train_tokenizer([SONNETS], 320, "unigram", out, kind="tokenizers")
    storage.upload(hf_path, f"{gcs_bucket}/tok/tokenizer.json")
    remote = prepare_tokenizer(DataConfig(tokenizer=f"{gcs_bucket}/tok/tokenizer.json"), "")
    assert remote.fingerprint == load_tokenizer(hf_path).fingerprint


def test_a_preparation_makes_one_tokenizer_for_all_its_shards(hf_path, tmp_path, monkeypatch):
    """Beam in process over 3 input files (3 shards): the tokenizer is deserialized once, as
    each Hugging Face tokenizer made holds on to memory (peak RSS grew with the shards)."""
    from lmjax.data import prepare

    made = []
    real = prepare.from_serialized
    monkeypatch.setattr(prepare, "from_serialized", lambda b: made.append(b) or real(b))
    prepare.worker_tokenizer.cache_clear()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = list(documents.read_documents(SONNETS))
    for i in range(3):
        (corpus / f"part-{i}.txt").write_text(documents.DOCUMENT_SEPARATOR.join(docs[i::3]))
    cfg = DataConfig(source="text", text_files=str(corpus), validation_fraction=0.1)
    _, meta = prepare.prepare(cfg, load_tokenizer(hf_path), str(tmp_path / "stores"))
    assert meta["summary"]["shards"] == 3 and len(made) == 1
    prepare.worker_tokenizer.cache_clear()


def test_store_and_checkpoint_record_the_tokenizer_and_refuse_another(hf_path, bpe_path, tmp_path):
    from lmjax.checkpoint import compat
    from lmjax.data import prepare, run_stores, sources, store

    hf, sp = load_tokenizer(hf_path), load_tokenizer(bpe_path)
    cfg = DataConfig(source="text", text_files=SONNETS, validation_fraction=0.1)
    directory, meta = prepare.prepare(cfg, hf, str(tmp_path))
    assert meta["tokenizer"] == hf.fingerprint and meta["vocab_size"] == 400
    split = store.StoreSplit(directory, "train", meta)
    first = split.read(np.array([0]), 40)[0]
    texts = [t for t in documents.read_documents(SONNETS) if not prepare.held_out(t, 0.1)]
    np.testing.assert_array_equal(first, np.concatenate(hf.encode_documents(texts[:3]))[:40])
    assert (
        sources.locate(cfg, sp, str(tmp_path))[0] != directory
    )  # another tokenizer: another store
    with pytest.raises(ConfigError, match="made with tokenizer"):
        run_stores.find_store(str(tmp_path), "text", sp)
    saved = {"tokenizer_fingerprint": hf.fingerprint}  # what compat.make_metadata records
    compat.check_tokenizer(saved, hf.fingerprint, "run")
    with pytest.raises(compat.ResumeError, match=f"tokenizer {hf.fingerprint}"):
        compat.check_tokenizer(saved, sp.fingerprint, "run")
