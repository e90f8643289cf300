"""`lmjax eval`: loss, perplexity and bits-per-byte of a saved checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Callable, Sequence

from lmjax import storage
from lmjax.commands import watch
from lmjax.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits-per-byte of a checkpoint")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--text-files", nargs="+", metavar="GLOB", help="UTF-8 files, one document each"
    )
    src.add_argument(
        "--experiment-data", action="store_true", help="the run's own evaluation batches"
    )
    p.add_argument("--context-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding-window stride for long documents (default: context_len / 2)",
    )
    p.add_argument("--json", action="store_true")
    watch.add_flag(p)
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    from lmjax.parallel import distributed

    distributed.initialize()  # started as several processes, they evaluate together
    with watch.watching(args.watchdog_seconds) as expect:
        main(
            args.workdir,
            args.step,
            args.text_files or (),
            args.experiment_data,
            args.json,
            context_len=args.context_len,
            stride=args.stride,
            expect=expect,
        )
    return 0


def main(
    workdir: str,
    step: int | None = None,
    text_files: Sequence[str] = (),
    use_experiment_data: bool = False,
    as_json: bool = False,
    *,
    context_len: int | None = None,
    stride: int | None = None,
    load: Callable | None = None,
    batches_for: Callable | None = None,
    expect: Callable[[str], None] = lambda phase: None,
) -> dict:
    """`lmjax eval`: scores a checkpoint on text files or on the experiment's eval split.

    text_files: globs of UTF-8 files, one document each (see `evaluate.score_texts`). context_len
    defaults to the run's data.seq_len, stride to half of it. `load(workdir, step)` and
    `batches_for(config, tokenizer, workdir)` are `saved_run.load` and `saved_run.eval_batches`
    unless replaced; `expect(phase)` is told of each phase (the watchdog's). Prints one line
    (or JSON), on process 0 of several, and returns the numbers (on every process).
    """
    from lmjax.data.documents import read_utf8
    from lmjax.inference import evaluate, saved_run
    from lmjax.parallel import distributed

    load = load or saved_run.load
    batches_for = batches_for or saved_run.eval_batches
    if bool(text_files) == bool(use_experiment_data):
        raise ConfigError("choose what to evaluate: --text-files GLOB... or --experiment-data.")
    paths = sorted({p for pattern in text_files for p in storage.glob(pattern)})
    if text_files and not paths:
        raise ConfigError(f"--text-files {' '.join(text_files)} matched no files.")
    expect("the restore of the checkpoint")
    config, params, tokenizer = load(workdir, step)
    expect("the evaluation (its text read, or its batches, prepared when missing)")
    if paths and tokenizer is None:
        raise ConfigError(
            f"the run in {workdir} has no tokenizer (synthetic data): it can "
            "only be evaluated with --experiment-data."
        )
    with saved_run.context(config):
        if paths:
            texts = [read_utf8(path) for path in paths]
            context_len = context_len or config.data.seq_len
            stride = stride or max(1, context_len // 2)
            result = evaluate.score_texts(
                params, config.model, tokenizer, texts, context_len=context_len, stride=stride
            )
            result["files"] = len(paths)
        else:
            batches = batches_for(config, tokenizer, workdir)
            result = evaluate.eval_loss(params, config.model, batches)
    if distributed.is_primary():
        print(json.dumps(result, sort_keys=True) if as_json else _one_line(result))
    return result


def _one_line(result: dict) -> str:
    return "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
    )
