"""`lmjax generate` (continue prompts with a saved checkpoint) and `lmjax bench generate`."""
from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax import generate, model
from lmjax.commands.runs import load_run
from lmjax.config import ConfigError, ModelConfig


def main(workdir: str, step: int | None, prompts: Sequence[str], max_new_tokens: int, *,
         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
         seed: int = 0) -> list[str]:
    """`lmjax generate`: continues every prompt with a checkpoint of `workdir`, in one batch.

    Prompts of different lengths are right-padded and given their true lengths, so each
    gets the same continuation it would get alone. Prints and returns the completions.
    """
    if not prompts:
        raise ConfigError("give at least one prompt: --prompt TEXT or --prompts-file FILE.")
    config, params, tokenizer = load_run(workdir, step)
    if tokenizer is None:
        raise ConfigError(f"the run in {workdir} has no tokenizer (synthetic data): nothing to "
                          "decode prompts with.")
    ids = [generate.prompt_ids(tokenizer, p) for p in prompts]
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


def bench(model_cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *,
          seed: int = 0) -> dict[str, float]:
    """Times prefill and decoding of random prompts with random weights; prints a table.

    Decode throughput counts every generated token (the loop never stops early). Both
    phases are compiled before timing. Returns the numbers printed.
    """
    tokens, lengths = generate.check_prompts(
        model_cfg, np.random.default_rng(seed).integers(0, model_cfg.vocab_size,
                                                        (batch, prompt_len)),
        None, new_tokens)
    params = jax.jit(model.init, static_argnums=0)(model_cfg, jax.random.PRNGKey(seed))
    max_len = prompt_len + new_tokens
    sampling = generate.Sampling()

    def run():
        t0 = time.perf_counter()
        logits, cache = jax.block_until_ready(generate.prefill_jit(
            params, tokens, lengths, cfg=model_cfg, max_len=max_len, context=None))
        t1 = time.perf_counter()
        jax.block_until_ready(generate.decode_jit(
            params, logits, cache, lengths, np.int32(seed), cfg=model_cfg, sampling=sampling,
            eos_id=None, max_new_tokens=new_tokens, context=None))
        return t1 - t0, time.perf_counter() - t1

    run()  # compile
    prefill_s, decode_s = run()
    cache_bytes = (2 * model_cfg.n_layers * batch * max_len * model_cfg.n_kv_heads
                   * model_cfg.head_dim * jnp.dtype(model_cfg.dtype).itemsize)
    result = {"prefill_tokens_per_s": batch * prompt_len / prefill_s,
              "decode_tokens_per_s": batch * new_tokens / decode_s,
              "prefill_s": prefill_s, "decode_s": decode_s, "cache_bytes": cache_bytes}
    print(f"generate benchmark on {jax.devices()[0].device_kind}: "
          f"{model.count_params(model_cfg):,} params, {model_cfg.dtype}, batch {batch}, "
          f"prompt {prompt_len}, new {new_tokens}")
    print(f"{'phase':<8}{'tokens':>10}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'prefill':<8}{batch * prompt_len:>10}{prefill_s:>10.4f}"
          f"{result['prefill_tokens_per_s']:>12.1f}")
    print(f"{'decode':<8}{batch * new_tokens:>10}{decode_s:>10.4f}"
          f"{result['decode_tokens_per_s']:>12.1f}")
    print(f"KV cache: {cache_bytes:,} bytes (k and v, [layers, batch, max_len={max_len}, "
          f"kv_heads, head_dim])")
    return result
