"""Input formats (.txt, .jsonl, gzip, zstd, Parquet), streamed and cut into parts: the same
corpus in every format, in any number of files or parts, gives the same documents, the same
counts and the same validation split; reading holds a chunk, never the file."""

import gzip
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lmjax import storage
from lmjax.config import ConfigError, DataConfig
from lmjax.data import documents, prepare, sources, store
from lmjax.data.tokenizer import load_tokenizer, train_tokenizer

SONNETS = os.path.join(documents.PACKAGED_DIR, "sonnets.txt")


@pytest.fixture(scope="module")
def docs():
    """80 documents: sonnets, some with non-ASCII text, a JSON-hostile one and a long one."""
    sonnets = documents.split_text(open(SONNETS).read())[1:78]
    return sonnets + ['quotes " and \\ back\\slashes ✓ ünï', "日本語の文書\n二行目", "x " * 3000]


def write(path, form, texts, blanks=False, row_group=7):
    """`texts` as one file of format `form` (blanks: add empty documents/blank lines)."""
    extra = ["", "  \n"] if blanks else []
    if form == "parquet":
        table = pa.table({"id": list(range(len(texts) + len(extra))), "text": texts + extra})
        pq.write_table(table, path, row_group_size=row_group)
        return
    if form.startswith("txt"):
        data = "\f".join(texts + extra).encode()
    else:
        lines = [json.dumps({"text": t, "n": i}) for i, t in enumerate(texts)]
        data = ("\n".join(lines + ([""] if blanks else [])) + "\n").encode()
    if form.endswith(".gz"):
        data = gzip.compress(data)
    elif form.endswith(".zst"):  # two frames: readers must go across frames
        half = len(data) // 2
        z = zstandard.ZstdCompressor()
        data = z.compress(data[:half]) + z.compress(data[half:])
    with open(path, "wb") as f:
        f.write(data)


FORMATS = ("txt", "txt.zst", "jsonl", "jsonl.gz", "jsonl.zst", "parquet")


def corpus(root, form, texts, files):
    """`texts` cut into `files` files of format `form` under `root`; returns the directory."""
    root.mkdir(parents=True)
    cuts = np.linspace(0, len(texts), files + 1).astype(int)
    for i in range(files):
        write(root / f"part{i:02d}.{form}", form, texts[cuts[i] : cuts[i + 1]], blanks=i == 0)
    return str(root)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("tok") / "sonnets"
    return load_tokenizer(train_tokenizer([SONNETS], 384, "bpe", str(prefix)))


def streams(directory, meta):
    out = {}
    for split in store.SPLITS:
        s = store.StoreSplit(directory, split, meta)
        out[split] = s.read(np.array([0]), s.n_tokens)[0]
    return out


def naive(texts, tok, fraction):
    """The streams by the rule: held out when sha256(text) < fraction * 2**256."""
    out = {"train": [], "validation": []}
    for t in texts:
        held = int(hashlib.sha256(t.encode()).hexdigest(), 16) < fraction * 2**256
        out["validation" if held else "train"] += [tok.bos_id, *tok.encode(t), tok.eos_id]
    return out


def test_every_format_and_cut_gives_the_same_documents_split_and_counts(
    docs, tok, tmp_path, monkeypatch
):
    reference = naive(docs, tok, 0.2)
    assert len(reference["validation"]) > 100 and len(reference["train"]) > 100
    cases = [(form, 1) for form in FORMATS] + [("txt", 3), ("jsonl.zst", 2), ("parquet", 2)]
    # Small parts and chunks: byte ranges and chunks cut through documents and lines.
    monkeypatch.setattr(documents, "PART_BYTES", 5000)
    monkeypatch.setattr(documents, "CHUNK_BYTES", 333)
    for form, files in cases:
        where = corpus(tmp_path / f"{form}-{files}", form, docs, files)
        cfg = DataConfig(source="text", text_files=where, validation_fraction=0.2)
        directory, meta = prepare.prepare(cfg, tok, str(tmp_path / "stores"))
        got = streams(directory, meta)
        for split in store.SPLITS:
            np.testing.assert_array_equal(got[split], reference[split], err_msg=f"{form} {split}")
        s = meta["summary"]
        # .txt blanks are two empty documents; a blank .jsonl line is none; Parquet's "" and
        # "  \n" rows are two.
        empty = 0 if form.startswith("jsonl") else 2
        assert (s["documents"], s["empty_documents"], s["empty_files"]) == (len(docs), empty, 0)
        compressed = form.endswith((".gz", ".zst"))
        # Uncompressed text in byte ranges, Parquet in row groups (7 rows each).
        assert (s["shards"] > files) == (not compressed), (form, s["shards"])


def test_parts_of_a_file_hold_each_document_once_whatever_the_cut(docs, tmp_path, monkeypatch):
    path = str(tmp_path / "a.txt")
    write(path, "txt", docs)
    size = os.path.getsize(path)
    whole = list(documents.read_documents(path))
    for part_bytes in (50, 997, 6001, size - 1, size):
        monkeypatch.setattr(documents, "PART_BYTES", part_bytes)
        parts = documents.file_parts(path, size)
        assert parts[-1][1] == -1 and len(parts) == -(-size // part_bytes)
        counts = documents.ReadCounts()
        got = [
            d
            for a, b in parts
            for d in documents.read_documents(path, start=a, stop=b, counts=counts)
        ]
        assert got == whole and counts.bytes == size, part_bytes
        assert counts.empty_files == 0 and counts.empty_documents == 0


def test_bad_utf8_empty_files_and_format_errors(tmp_path):
    z = zstandard.ZstdCompressor()
    (tmp_path / "x.txt.zst").write_bytes(z.compress(b"good one\f bad \xff here\fthird"))
    with pytest.raises(ConfigError, match=r"x.txt.zst: byte 14 is not UTF-8.*bad_utf8=skip"):
        list(documents.read_documents(str(tmp_path / "x.txt.zst")))
    counts = documents.ReadCounts()
    got = list(
        documents.read_documents(str(tmp_path / "x.txt.zst"), bad_utf8="skip", counts=counts)
    )
    assert got == ["good one", "third"] and counts.bad_utf8 == 1
    pq.write_table(pa.table({"body": [b"fine", b"caf\xe9"]}), tmp_path / "b.parquet")
    with pytest.raises(ConfigError, match=r"b.parquet: row 1, byte 3 of its text is not UTF-8"):
        list(documents.read_documents(str(tmp_path / "b.parquet"), "body"))
    with pytest.raises(ConfigError, match=r"no column 'text' \(it has \['body'\]\).*text_feature"):
        list(documents.read_documents(str(tmp_path / "b.parquet")))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(ConfigError, match="holds int64, not text"):
        list(documents.read_documents(str(tmp_path / "n.parquet")))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match="junk.parquet is not a Parquet file"):
        documents.file_parts(str(tmp_path / "junk.parquet"), 18)
    (tmp_path / "j.jsonl.zst").write_bytes(z.compress(b'{"text": "a"}\n{"text": 3}\n'))
    with pytest.raises(ConfigError, match=r"j.jsonl.zst: the line at byte 14 has no string"):
        list(documents.read_documents(str(tmp_path / "j.jsonl.zst")))
    for name, data in (("e.jsonl.gz", gzip.compress(b"\n \n")), ("e.txt.zst", z.compress(b"\f\n"))):
        (tmp_path / name).write_bytes(data)
        counts = documents.ReadCounts()
        assert not list(documents.read_documents(str(tmp_path / name), counts=counts))
        assert (counts.empty_files, counts.empty_documents) == (1, 0), name
    with pytest.raises(ConfigError, match=r"unsupported files.*\.parquet"):
        (tmp_path / "c.csv").write_text("a,b")
        documents.expand_files(str(tmp_path / "c.csv"))


def test_formats_and_parts_read_through_gcs(docs, tmp_path, monkeypatch, gcs_bucket):
    # On the tests' GCS server: reading (seeks into byte ranges and row groups) must not
    # assume a local path.
    monkeypatch.setattr(documents, "PART_BYTES", 4000)
    for form in ("txt", "jsonl.zst", "parquet"):
        local = str(tmp_path / f"c.{form}")
        write(local, form, docs)
        remote = f"{gcs_bucket}/inputs/c.{form}"
        storage.upload(local, remote)
        parts = documents.file_parts(remote, storage.path(remote).stat().length)
        assert len(parts) > 1 or form == "jsonl.zst"
        got = [d for a, b in parts for d in documents.read_documents(remote, start=a, stop=b)]
        assert got == docs, form
    cfg = DataConfig(
        source="text", text_files=f"{gcs_bucket}/inputs/*.parquet", validation_fraction=0.2
    )
    assert [s.start for s in sources.input_shards(cfg)[1]] == list(range(len(docs) // 7 + 1))
