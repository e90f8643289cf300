"""Decode speed with window-sized local caches against full-length ones, for the README:
a small Gemma-3-shaped model (five local layers of window 128 per global one) on this
machine's CPU, the two caches timed in turn (`bench.time_generation`), best of `--repeats`:

    PYTHONPATH=. python scripts/bench_window_cache.py --prompt-len 4096 --new-tokens 256
"""

from __future__ import annotations

import argparse

from lmjax.config import ModelConfig
from lmjax.tools import bench

MODEL = ModelConfig(
    vocab_size=256,
    d_model=64,
    n_layers=6,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    d_mlp=128,
    max_seq_len=32768,
    sliding_window=128,
    global_every=6,
    dtype="float32",
    param_dtype="float32",
    attention="xla",
    remat="none",
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for window in (True, False):
            runs[window].append(
                bench.time_generation(
                    MODEL, args.batch, args.prompt_len, args.new_tokens, window_cache=window
                )
            )
    for window, rs in runs.items():
        decode = max(r["decode_tokens_per_s"] for r in rs)
        prefill = max(r["prefill_tokens_per_s"] for r in rs)
        print(
            f"{'window' if window else 'full'} cache: {rs[0]['cache_bytes']:,} bytes; decode "
            f"{decode:,.0f} tokens/s (all: {[round(r['decode_tokens_per_s']) for r in rs]}); "
            f"prefill {prefill:,.0f} tokens/s"
        )


if __name__ == "__main__":
    main()
