"""Tokenizers of both kinds (SentencePiece, Hugging Face tokenizer.json): training (seeded),
loading (local and from the tests' GCS server), special tokens, round trips, identity."""

import subprocess
import sys

from lmjax.data import documents
from lmjax.data.tokenizer import (
    sample_lines,
    train_from_texts,
)
from tests.unit.test_tokenizer import SONNETS


def test_sentencepiece_training_is_seeded(tmp_path):
    """The same texts and seed give the same model bytes, in this process and in another (where
    SentencePiece's own sampler would draw another sample); another seed another sample."""
    texts = list(documents.read_documents(SONNETS))

    def train(prefix, seed):
        return open(
            train_from_texts(texts, 320, "bpe", prefix, seed=seed, sample_sentences=500), "rb"
        ).read()

    here = train(str(tmp_path / "a"), 0)
    script = (
        "import sys; from lmjax.data import documents, tokenizer as t; "
        "texts = documents.split_text(open(sys.argv[1]).read()); "
        "sys.stdout.buffer.write(t.train_sentencepiece(texts, 320, 'bpe', 0, 500))"
    )
    there = subprocess.run([sys.executable, "-c", script, SONNETS], capture_output=True, check=True)
    assert there.stdout == here == train(str(tmp_path / "c"), 0)
    assert train(str(tmp_path / "d"), 1) != here
    assert len(sample_lines(["a\nb\nc", "d\ne"], 3, 0)) == 3
    assert sample_lines(["a\nb\nc", "d\ne"], 9, 0) == ["a", "b", "c", "d", "e"]
