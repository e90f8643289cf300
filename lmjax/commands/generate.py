"""`lmjax generate`: continue prompts with a saved checkpoint."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lmjax import generate
from lmjax.commands.runs import load_run
from lmjax.config import ConfigError
from lmjax.data.documents import read_utf8


def main(workdir: str, step: int | None, prompts: Sequence[str], max_new_tokens: int, *,
         prompts_file: str = "", temperature: float = 0.0, top_k: int | None = None,
         top_p: float | None = None, seed: int = 0) -> list[str]:
    """`lmjax generate`: continues every prompt with a checkpoint of `workdir`, in one batch.

    `prompts_file`: more prompts, one per non-blank line. Prompts of different lengths are
    right-padded and given their true lengths, so with greedy decoding each gets the
    continuation it would get alone (sampled rows also depend on their row index). Prints and
    returns the completions.
    """
    if prompts_file:
        prompts = [*prompts, *(line for line in read_utf8(prompts_file).splitlines()
                               if line.strip())]
    if not prompts:
        raise ConfigError("give at least one prompt: --prompt TEXT or --prompts-file FILE.")
    config, params, tokenizer = load_run(workdir, step)
    if tokenizer is None:
        raise ConfigError(f"the run in {workdir} has no tokenizer (synthetic data): nothing to "
                          "decode prompts with.")
    ids = tokenizer.encode_documents(list(prompts), eos=False)
    width = max(map(len, ids))
    padded = np.full((len(ids), width), tokenizer.pad_id, np.int32)
    for row, seq in zip(padded, ids):
        row[:len(seq)] = seq
    new = np.asarray(generate.generate(
        params, config.model, padded, max_new_tokens=max_new_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_id=tokenizer.eos_id,
        prompt_lengths=[len(s) for s in ids]))
    completions = []
    for prompt, row in zip(prompts, new.tolist()):
        if tokenizer.eos_id in row:
            row = row[:row.index(tokenizer.eos_id)]
        completions.append(tokenizer.decode(tokenizer.encode(prompt) + row))
        print(completions[-1])
        print("-" * 40)
    return completions
