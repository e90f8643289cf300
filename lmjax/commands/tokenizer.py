"""`lmjax tokenizer train`: a SentencePiece model or a Hugging Face tokenizer.json for a corpus."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece or tokenizer.json tokenizer")
    tk = p.add_subparsers(dest="tokenizer_command", required=True)
    q = tk.add_parser(
        "train",
        help="train on text files (.txt, .jsonl, .parquet, gzip or zstd); pad/bos/eos = 0-2",
    )
    q.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="GLOB",
        help="files, globs or directories (local or gs://)",
    )
    q.add_argument("--vocab-size", type=int, required=True)
    q.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    q.add_argument(
        "--kind",
        choices=["sentencepiece", "tokenizers"],
        default="sentencepiece",
        help="sentencepiece: PREFIX.model (byte fallback); tokenizers: a Hugging Face "
        "PREFIX.json (byte-level BPE, Llama 3's split)",
    )
    q.add_argument(
        "--output",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.model and PREFIX.vocab, or PREFIX.json",
    )
    q.add_argument(
        "--text-key", default="text", help="JSON key (.jsonl) or column (.parquet) of the text"
    )
    q.add_argument("--seed", type=int, default=0, help="seeds SentencePiece's sentence sample")
    q.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    return train(
        args.input,
        args.vocab_size,
        args.model_type,
        args.output,
        text_key=args.text_key,
        kind=args.kind,
        seed=args.seed,
    )


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
    from lmjax.data import tokenizer

    path = tokenizer.train_tokenizer(
        inputs, vocab_size, model_type, output, text_key=text_key, kind=kind, seed=seed
    )
    tok = tokenizer.load_tokenizer(path)
    print(f"{path}: vocab_size={tok.vocab_size} fingerprint={tok.fingerprint}")
    return 0
