"""`lmjax tokenizer train`: a SentencePiece model for a corpus."""

from __future__ import annotations

from lmjax.data import tokenizer


def train(
    inputs: list[str], vocab_size: int, model_type: str, output: str, text_key: str = "text"
) -> int:
    """Trains on .txt/.jsonl files, writes OUTPUT.model and .vocab, prints its fingerprint."""
    path = tokenizer.train_tokenizer(inputs, vocab_size, model_type, output, text_key=text_key)
    tok = tokenizer.load_tokenizer(path)
    print(f"{path}: vocab_size={tok.vocab_size} fingerprint={tok.fingerprint}")
    return 0
