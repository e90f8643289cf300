"""SentencePiece training, loading (local and a non-local tf.io.gfile filesystem), round trips."""

import json
import os

import pytest

from lmjax.config import ConfigError, DataConfig
from lmjax.data import documents
from lmjax.data.prepare import prepare_tokenizer
from lmjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_tokenizer, train_tokenizer

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


def test_load_through_non_local_filesystem(bpe_path):
    # ram:// is a tf.io.gfile filesystem like gs://: loading must not assume a local path.
    import tensorflow as tf

    with open(bpe_path, "rb") as src, tf.io.gfile.GFile("ram://tokenizers/t.model", "wb") as dst:
        dst.write(src.read())
    tok = load_tokenizer("ram://tokenizers/t.model")
    assert tok.fingerprint == load_tokenizer(bpe_path).fingerprint


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
