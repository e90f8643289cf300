"""SentencePiece tokenizers: training, loading (local or gs://), and identity by fingerprint.

Models trained here use byte fallback (no unknown tokens), keep newlines and runs of spaces
(identity normalisation, `\\n` as a piece) so `decode(encode(text)) == text`, and fix the
special ids: pad 0, bos 1, eos 2, unk 3.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import Iterable, Iterator

from lmjax.config import ConfigError
from lmjax.data import documents

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# A run without data.tokenizer trains its tokenizer into WORKDIR/RUN_TOKENIZER.
RUN_TOKENIZER = "tokenizer.model"
MODEL_TYPES = ("bpe", "unigram")


class Tokenizer:
    """A loaded SentencePiece model. `fingerprint` is a short hash of the model file."""

    def __init__(self, model_proto: bytes, path: str = ""):
        import sentencepiece as spm

        self.path = path
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:12]
        if self._sp.eos_id() < 0:
            raise ConfigError(
                f"tokenizer {path or '<bytes>'} has no EOS piece, which the data "
                "pipeline appends to every document: train one with "
                "`lmjax tokenizer train`."
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id; a model trained without one pads with EOS."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_documents(self, texts: list[str], *, eos: bool = True) -> list[list[int]]:
        """Each text as a document: BOS (when the model has one), its tokens, then EOS.

        Training data, evaluation and prompts all start documents this way; prompts pass
        `eos=False` because their document continues.
        """
        bos = [self.bos_id] if self.bos_id >= 0 else []
        end = [self.eos_id] if eos else []
        return [bos + ids + end for ids in self._sp.encode(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint})"


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a `.model` file from a local or gs:// path."""
    io_ = documents.gfile()
    if not io_.exists(path):
        raise ConfigError(
            f"tokenizer model {path!r} does not exist: set data.tokenizer to a "
            "SentencePiece .model file, or leave it empty to train one into the workdir."
        )
    with io_.GFile(path, "rb") as f:
        proto = f.read()
    try:
        return Tokenizer(proto, path)
    except RuntimeError as e:
        raise ConfigError(f"{path!r} is not a SentencePiece model ({e}).") from None


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on lines; a document's lines are its sentences."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_from_texts(
    texts: Iterable[str], vocab_size: int, model_type: str, output_prefix: str
) -> str:
    """Trains on an iterable of documents and writes `output_prefix.model` and `.vocab`."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model type {model_type!r}: choose one of {MODEL_TYPES}.")
    if vocab_size < 300:
        raise ConfigError(
            f"vocab size {vocab_size} is too small: byte fallback alone takes 256 "
            "pieces plus the specials; use at least 300."
        )
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            input_sentence_size=5_000_000,
            shuffle_input_sentence=True,
            max_sentence_length=16384,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ConfigError(
            f"SentencePiece training failed: {e}. A vocabulary larger than the "
            "text supports is the usual cause: lower the vocab size or add text."
        ) from None
    _write_model(model.getvalue(), output_prefix)
    return output_prefix + ".model"


def _write_model(proto: bytes, output_prefix: str) -> None:
    """`output_prefix.model` (written under a temporary name and renamed, so concurrent
    processes never read half a file) and the readable `output_prefix.vocab`."""
    tok = Tokenizer(proto, output_prefix + ".model")
    io_ = documents.gfile()
    parent = os.path.dirname(output_prefix)
    if parent:
        io_.makedirs(parent)
    tmp = f"{output_prefix}.model.tmp-{os.getpid()}"
    with io_.GFile(tmp, "wb") as f:
        f.write(proto)
    io_.rename(tmp, output_prefix + ".model", overwrite=True)
    with io_.GFile(output_prefix + ".vocab", "w") as f:
        f.write(
            "".join(
                f"{tok._sp.id_to_piece(i)!r}\t{tok._sp.get_score(i)}\n"
                for i in range(tok.vocab_size)
            )
        )


def train_tokenizer(
    input_files: list[str] | str,
    vocab_size: int,
    model_type: str,
    output_prefix: str,
    text_key: str = "text",
) -> str:
    """Trains on `.txt`/`.jsonl` files (globs or directories; local or gs://); returns the .model path."""
    spec = input_files if isinstance(input_files, str) else ",".join(input_files)
    files = documents.expand_files(spec, what="--input")
    texts = (doc for path in files for doc in documents.read_documents(path, text_key))
    return train_from_texts(texts, vocab_size, model_type, output_prefix)
