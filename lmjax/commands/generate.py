"""`lmjax generate`: continue prompts with a saved checkpoint."""

from __future__ import annotations

import argparse
from typing import Callable, Sequence

from lmjax import storage
from lmjax.commands import watch
from lmjax.config import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue prompts with a checkpoint (KV cache)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", default="", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    watch.add_flag(p)
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    from lmjax.parallel import distributed

    distributed.initialize()  # started as several processes, they generate together
    with watch.watching(args.watchdog_seconds) as expect:
        main(
            args.workdir,
            args.step,
            list(args.prompt),
            args.max_new_tokens,
            prompts_file=args.prompts_file,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            expect=expect,
        )
    return 0


def main(
    workdir: str,
    step: int | None,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    prompts_file: str = "",
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    expect: Callable[[str], None] = lambda phase: None,
) -> list[str]:
    """`lmjax generate`: continues every prompt with a checkpoint of `workdir`, in one batch.

    `prompts_file`: more prompts, one per non-blank line. See `generate.complete`. Prints the
    completions (on process 0 of several) and returns them (on every process). `expect(phase)`
    is told of each phase (the watchdog's).
    """
    from lmjax.data.documents import read_utf8
    from lmjax.inference import generate, saved_run
    from lmjax.parallel import distributed

    if prompts_file and not storage.path(prompts_file).exists():
        raise ConfigError(f"--prompts-file {prompts_file} does not exist.")
    if prompts_file:
        prompts = [
            *prompts,
            *(line for line in read_utf8(prompts_file).splitlines() if line.strip()),
        ]
    if not prompts:
        raise ConfigError("give at least one prompt: --prompt TEXT or --prompts-file FILE.")
    expect("the restore of the checkpoint")
    config, params, tokenizer = saved_run.load(workdir, step)
    expect("the generation")
    if tokenizer is None:
        raise ConfigError(
            f"the run in {workdir} has no tokenizer (synthetic data): nothing to "
            "decode prompts with."
        )
    with saved_run.context(config):
        completions = generate.complete(
            params,
            config.model,
            tokenizer,
            prompts,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
    for text in completions if distributed.is_primary() else ():
        print(text)
        print("-" * 40)
    return completions
