"""Tokenizers: SentencePiece models (`.model`) and Hugging Face `tokenizers` files
(`tokenizer.json`, e.g. the byte-level BPE of Llama 3, Qwen and Mistral); training, loading
(local or gs://) and identity by fingerprint (a short hash of the file's bytes, recorded in
stores and checkpoints).

Both kinds offer the same small interface (`Tokenizer`). The kind follows the file: a path
ending in `.json` is a `tokenizer.json`, anything else a SentencePiece model; serialized
bytes (what preparation sends to its workers) are a `tokenizer.json` when they start with `{`
(a SentencePiece model is a protobuf, whose first byte is a field tag, never `{`).

SentencePiece models trained here use byte fallback (no unknown tokens), keep newlines and
runs of spaces (identity normalisation, `\\n` as a piece) so `decode(encode(text)) == text`,
and fix the special ids: pad 0, bos 1, eos 2, unk 3. `tokenizer.json` files trained here are
byte-level BPE with Llama 3's pre-tokenizer split, pad/bos/eos `<pad>` `<s>` `</s>` = 0-2.
A `tokenizer.json` from elsewhere names its BOS, EOS and pad by its special tokens: the
first of `BOS_TOKENS`, `EOS_TOKENS`, `PAD_TOKENS` it defines (no BOS: none is prepended; no
pad: EOS pads). Training is seeded: the same inputs give the same file, byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
from typing import Iterable, Iterator, Protocol

from lmjax import storage
from lmjax.config import ConfigError
from lmjax.data import documents

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")
KINDS = ("sentencepiece", "tokenizers")
# Special tokens of published tokenizer.json files, in order of preference: Llama 3,
# Mistral/Llama 2, Gemma, then GPT-2/Qwen (whose one special token ends documents).
BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>")
EOS_TOKENS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")
PAD_TOKENS = ("<pad>", "<|pad|>")
# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern): contractions, letters, 1-3
# digits, punctuation runs, newlines, spaces.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
    r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer(Protocol):
    """What lmjax needs of a tokenizer; `SentencePieceTokenizer` and `HFTokenizer` have it."""

    path: str
    serialized: bytes  # the file's bytes: `from_serialized(serialized)` rebuilds it
    fingerprint: str
    vocab_size: int
    bos_id: int  # -1: documents start without one
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def encode_documents(self, texts: list[str], *, eos: bool = True) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _fingerprint(serialized: bytes) -> str:
    return hashlib.sha256(serialized).hexdigest()[:12]


def as_documents(tok: Tokenizer, texts: list[str], eos: bool) -> list[list[int]]:
    """Each text as a document: BOS (when the tokenizer has one), its tokens, then EOS.

    Training data, evaluation and prompts all start documents this way; prompts pass
    `eos=False` because their document continues. Encoding is one batched (multi-threaded)
    call."""
    bos = [tok.bos_id] if tok.bos_id >= 0 else []
    end = [tok.eos_id] if eos else []
    return [bos + ids + end for ids in tok.encode_batch(texts)]


def describe(tok: Tokenizer) -> str:
    return (
        f"{type(tok).__name__}({tok.path!r}, vocab_size={tok.vocab_size}, "
        f"fingerprint={tok.fingerprint})"
    )


def _no_eos(path: str) -> ConfigError:
    return ConfigError(
        f"tokenizer {path or '<bytes>'} has no EOS token, which the data pipeline appends "
        "to every document: train one with `lmjax tokenizer train`."
    )


class SentencePieceTokenizer:
    """A loaded SentencePiece model."""

    def __init__(self, serialized: bytes, path: str = ""):
        import sentencepiece as spm

        self.path = path
        self.serialized = serialized
        self._sp = spm.SentencePieceProcessor(model_proto=serialized)
        self.fingerprint = _fingerprint(serialized)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.eos_id < 0:
            raise _no_eos(path)
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else self.eos_id  # a model without pad pads with EOS

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)  # a list is encoded in sentencepiece's threads

    def encode_documents(self, texts: list[str], *, eos: bool = True) -> list[list[int]]:
        return as_documents(self, texts, eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def pieces(self) -> Iterator[tuple[str, float]]:
        return ((self._sp.id_to_piece(i), self._sp.get_score(i)) for i in range(self.vocab_size))

    def __repr__(self) -> str:
        return describe(self)


class HFTokenizer:
    """A loaded Hugging Face `tokenizer.json`. Its own post-processor (which may add BOS) is
    not applied: documents get BOS and EOS as with every tokenizer (`as_documents`)."""

    def __init__(self, serialized: bytes, path: str = ""):
        from tokenizers import Tokenizer as Loaded

        self.path = path
        self.serialized = serialized
        try:
            self._tk = Loaded.from_str(serialized.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception; bytes may not be UTF-8
            raise ConfigError(
                f"{path or '<bytes>'} is not a Hugging Face tokenizer.json ({str(e)[:200]})."
            ) from None
        self.fingerprint = _fingerprint(serialized)
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        special = {
            t.content: i for i, t in self._tk.get_added_tokens_decoder().items() if t.special
        }
        self.bos_id = next((special[t] for t in BOS_TOKENS if t in special), -1)
        self.eos_id = next((special[t] for t in EOS_TOKENS if t in special), -1)
        if self.eos_id < 0:
            raise _no_eos(path)
        self.pad_id = next((special[t] for t in PAD_TOKENS if t in special), self.eos_id)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # In the library's Rust threads (TOKENIZERS_PARALLELISM); no character offsets.
        return [e.ids for e in self._tk.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_documents(self, texts: list[str], *, eos: bool = True) -> list[list[int]]:
        return as_documents(self, texts, eos)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return describe(self)


def from_serialized(serialized: bytes, path: str = "") -> Tokenizer:
    """The tokenizer whose file holds `serialized` (kind: module docstring)."""
    if serialized.lstrip()[:1] == b"{" or path.endswith(".json"):
        return HFTokenizer(serialized, path)
    try:
        return SentencePieceTokenizer(serialized, path)
    except RuntimeError as e:
        raise ConfigError(f"{path!r} is not a SentencePiece model ({e}).") from None


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a SentencePiece `.model` or a `tokenizer.json` from a local or gs:// path."""
    try:
        serialized = storage.path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"tokenizer {path!r} does not exist: set data.tokenizer to a SentencePiece "
            ".model or a Hugging Face tokenizer.json, or leave it empty to train one into "
            "the workdir."
        ) from None
    return from_serialized(serialized, path)


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on lines; a document's lines are its sentences."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def sample_lines(texts: Iterable[str], size: int, seed: int) -> list[str]:
    """A uniform sample of `size` lines of `texts` (all of them when there are fewer), in
    input order: reservoir sampling with Python's seeded Mersenne Twister, so the same texts
    and seed give the same sample on every machine. SentencePiece's own sampler ignores
    `set_random_generator_seed` (it draws a fresh seed in every process), so it is not used."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for i, line in enumerate(_lines(texts)):
        if i < size:
            reservoir.append((i, line))
        elif (j := rng.randrange(i + 1)) < size:
            reservoir[j] = (i, line)
    return [line for _, line in sorted(reservoir)]


def _check_training(vocab_size: int, model_type: str, kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind {kind!r}: choose one of {KINDS}.")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model type {model_type!r}: choose one of {MODEL_TYPES}.")
    if kind == "tokenizers" and model_type != "bpe":
        raise ConfigError(
            "tokenizer.json files are trained as byte-level BPE: use --model-type bpe."
        )
    if vocab_size < 300:
        raise ConfigError(
            f"vocab size {vocab_size} is too small: the 256 bytes alone take 256 "
            "pieces plus the specials; use at least 300."
        )


def train_from_texts(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str,
    output_prefix: str,
    *,
    kind: str = "sentencepiece",
    seed: int = 0,
    sample_sentences: int = 5_000_000,
) -> str:
    """Trains on an iterable of documents; returns the written path: `output_prefix.model`
    (and a readable `.vocab`) for SentencePiece, `output_prefix.json` for tokenizers.

    SentencePiece trains on a sample of `sample_sentences` lines drawn with `seed`."""
    _check_training(vocab_size, model_type, kind)
    if kind == "tokenizers":
        path = output_prefix + ".json"
        _write_atomic(path, _train_bytelevel_bpe(texts, vocab_size))
        return path
    proto = train_sentencepiece(texts, vocab_size, model_type, seed, sample_sentences)
    tok = SentencePieceTokenizer(proto, output_prefix + ".model")
    _write_atomic(tok.path, proto)
    vocab = "".join(f"{piece!r}\t{score}\n" for piece, score in tok.pieces())
    storage.path(output_prefix + ".vocab").write_text(vocab)
    return tok.path


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, model_type: str, seed: int, sample_sentences: int
) -> bytes:
    """The serialized SentencePiece model trained on a seeded sample of the texts' lines."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample_lines(texts, sample_sentences, seed)),
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
            input_sentence_size=0,  # every line given: the sample is drawn above
            shuffle_input_sentence=False,
            max_sentence_length=16384,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ConfigError(
            f"SentencePiece training failed: {e}. A vocabulary larger than the "
            "text supports is the usual cause: lower the vocab size or add text."
        ) from None
    return model.getvalue()


def _train_bytelevel_bpe(texts: Iterable[str], vocab_size: int) -> bytes:
    """A byte-level BPE tokenizer.json (Llama 3's split, then bytes as characters)."""
    from tokenizers import Regex, Tokenizer as Untrained, decoders, models, pre_tokenizers, trainers

    tk = Untrained(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],  # ids 0-2: PAD_ID, BOS_ID, EOS_ID
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return tk.to_str(pretty=True).encode("utf-8")


def _write_atomic(path: str, data: bytes) -> None:
    """Written whole or not at all (`storage.write_atomic`), so concurrent processes never
    read half a file, into a folder made when missing."""
    storage.path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, data)


def train_tokenizer(
    input_files: list[str] | str,
    vocab_size: int,
    model_type: str,
    output_prefix: str,
    text_key: str = "text",
    *,
    kind: str = "sentencepiece",
    seed: int = 0,
) -> str:
    """Trains on text files (any format `documents` reads; globs or directories; local or
    gs://); returns the written path (`train_from_texts`)."""
    _check_training(vocab_size, model_type, kind)
    spec = input_files if isinstance(input_files, str) else ",".join(input_files)
    files = documents.expand_files(spec, what="--input")
    texts = (doc for path in files for doc in documents.read_documents(path, text_key))
    return train_from_texts(texts, vocab_size, model_type, output_prefix, kind=kind, seed=seed)
