"""`lmjax generate`: continue prompts with a saved checkpoint."""

from __future__ import annotations

from typing import Sequence

from lmjax import storage
from lmjax.config import ConfigError
from lmjax.data.documents import read_utf8
from lmjax.inference import generate, saved_run


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
) -> list[str]:
    """`lmjax generate`: continues every prompt with a checkpoint of `workdir`, in one batch.

    `prompts_file`: more prompts, one per non-blank line. See `generate.complete`. Prints and
    returns the completions.
    """
    if prompts_file and not storage.path(prompts_file).exists():
        raise ConfigError(f"--prompts-file {prompts_file} does not exist.")
    if prompts_file:
        prompts = [
            *prompts,
            *(line for line in read_utf8(prompts_file).splitlines() if line.strip()),
        ]
    if not prompts:
        raise ConfigError("give at least one prompt: --prompt TEXT or --prompts-file FILE.")
    config, params, tokenizer = saved_run.load(workdir, step)
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
    for text in completions:
        print(text)
        print("-" * 40)
    return completions
