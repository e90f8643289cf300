"""Cloud Storage through the tests' GCS server (tests/conftest.py's `gcs_bucket`): the fixture
itself, then lmjax.storage and the params-only and Hugging Face directories on gs://, each
with only STORAGE_EMULATOR_HOST set, beside the same calls on a local directory."""

import gzip
import os

import gcsfs
import numpy as np
import pytest

from lmjax import storage
from lmjax.checkpoint import params_dir
from lmjax.config import ConfigError
from lmjax.convert import hf
from lmjax.data import documents, tokenizer as tokenizer_lib
from tests.configs import SMALL_LM
from tests.helpers import random_model


def test_the_gcs_fixture_serves_a_bucket_to_a_client_given_only_the_emulator_host(
    gcs_bucket, gcs_server
):
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_server.url
    fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
    bucket = gcs_bucket.removeprefix("gs://")
    fs.pipe(f"{bucket}/a/b.txt", b"hello")
    assert fs.ls(bucket, detail=False) == [f"{bucket}/a"]
    assert fs.cat(f"{bucket}/a/b.txt") == b"hello"


def test_write_atomic_leaves_no_temporary_file_when_it_fails(tmp_path, small_disk, monkeypatch):
    """A write whose rename fails (the name is a folder) and, on a 1 MiB tmpfs where this
    test may mount one, a write that fills the disk: each raises and leaves nothing but what
    was there; two writes never share a temporary name."""
    (tmp_path / "folder").mkdir()
    with pytest.raises(OSError):
        storage.write_atomic(str(tmp_path / "folder"), b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "small"]
    if small_disk is not None:
        storage.write_atomic(str(small_disk / "kept"), b"old")
        with pytest.raises(OSError, match="No space left"):
            storage.write_atomic(str(small_disk / "kept"), b"\0" * 2**21)
        assert [p.name for p in small_disk.iterdir()] == ["kept"]
        assert (small_disk / "kept").read_bytes() == b"old"
        print("the full-disk case ran on a 1 MiB tmpfs")
    names, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (names.append(src), real(src, dst)))
    for _ in range(2):
        storage.write_atomic(str(tmp_path / "same"), b"x")
    assert len(set(names)) == 2


def test_storage_writes_globs_and_reads_back(storage_root):
    storage.path(storage_root).mkdir(parents=True, exist_ok=True)
    for name in ("b.txt", "a.txt", "c.jsonl"):
        storage.write_atomic(storage.join(storage_root, name), name.encode())
    assert storage.glob(storage.join(storage_root, "*.txt")) == [
        storage.join(storage_root, "a.txt"),
        storage.join(storage_root, "b.txt"),
    ]
    assert storage.path(storage.join(storage_root, "c.jsonl")).read_text() == "c.jsonl"
    assert storage.read_text_or_none(storage.join(storage_root, "absent")) is None
    with storage.staged(storage.join(storage_root, "big.bin")) as local:
        with open(local, "wb") as f:
            f.write(bytes(range(256)) * 1000)
    with storage.local_copy(storage.join(storage_root, "big.bin")) as local:
        assert os.path.isfile(local) and open(local, "rb").read() == bytes(range(256)) * 1000
    assert storage.glob(storage.join(storage_root, "nothing-*")) == []
    moved = storage.join(storage_root, "aside", "moved")
    storage.path(moved).parent.mkdir(parents=True, exist_ok=True)
    step = storage.join(storage_root, "step")
    for name in ("x", "sub/y"):
        storage.path(storage.join(step, name)).parent.mkdir(parents=True, exist_ok=True)
        storage.path(storage.join(step, name)).write_text(name)
    storage.rename(step, moved)  # a directory, into a folder that has no object yet
    assert not storage.path(step).exists()
    assert storage.path(storage.join(moved, "sub", "y")).read_text() == "sub/y"
    assert storage.path(storage.join(moved, "x")).read_text() == "x"


def test_documents_and_tokenizers_read_and_write_through_storage(storage_root, tokenizer):
    storage.path(storage_root).mkdir(parents=True, exist_ok=True)
    storage.path(storage.join(storage_root, "a.txt")).write_text("one\fthe second\f\n")
    storage.path(storage.join(storage_root, "b.jsonl.gz")).write_bytes(
        gzip.compress(b'{"text": "x"}\n')
    )
    files = documents.expand_files(storage_root)
    assert files == [storage.join(storage_root, "a.txt"), storage.join(storage_root, "b.jsonl.gz")]
    assert [d for f in files for d in documents.read_documents(f)] == ["one", "the second", "x"]
    path = storage.join(storage_root, "tok", "tokenizer.model")
    tokenizer_lib._write_atomic(path, tokenizer.serialized)  # into a folder not made yet
    loaded = tokenizer_lib.load_tokenizer(path)
    assert loaded.fingerprint == tokenizer.fingerprint
    with pytest.raises(ConfigError, match="does not exist"):
        tokenizer_lib.load_tokenizer(storage.join(storage_root, "absent.model"))


def test_params_and_hf_directories_round_trip(storage_root):
    params, _ = random_model(SMALL_LM)
    params_dir.save(SMALL_LM, params, storage.join(storage_root, "params"))
    cfg, loaded = params_dir.load(storage.join(storage_root, "params"))
    assert cfg == SMALL_LM
    with pytest.raises(ConfigError, match="already holds"):
        params_dir.require_new(storage.join(storage_root, "params"))
    hf.save(cfg, loaded, storage.join(storage_root, "hf"), max_shard_bytes=40_000)  # several shards
    assert len(storage.glob(storage.join(storage_root, "hf", "*.safetensors"))) > 1
    cfg2, from_hf = hf.load(storage.join(storage_root, "hf"))
    assert cfg2.n_layers == SMALL_LM.n_layers
    np.testing.assert_array_equal(from_hf["layers"]["wq"], np.asarray(params["layers"]["wq"]))
    np.testing.assert_array_equal(from_hf["embed"], np.asarray(params["embed"]))
    with pytest.raises(ConfigError, match="not empty"):
        hf.require_empty(storage.join(storage_root, "hf"))
