"""`lmjax tokenizer train`: a SentencePiece model or a Hugging Face tokenizer.json for a corpus."""

from __future__ import annotations

from lmjax.data import tokenizer


def train(
    inputs: list[str],
    vocab_size: int,
    model_type: str,
    output: str,
    text_key: str = "text",
    *,
    kind: str = "sentencepiece",
    seed: int = 0,
) -> int:
    """Trains on text files, writes OUTPUT.model and .vocab (or OUTPUT.json), prints its
    fingerprint."""
    path = tokenizer.train_tokenizer(
        inputs, vocab_size, model_type, output, text_key=text_key, kind=kind, seed=seed
    )
    tok = tokenizer.load_tokenizer(path)
    print(f"{path}: vocab_size={tok.vocab_size} fingerprint={tok.fingerprint}")
    return 0
