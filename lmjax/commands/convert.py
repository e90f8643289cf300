"""`lmjax convert from-hf|to-hf`: Hugging Face safetensors (Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3) <-> lmjax params directories."""

from __future__ import annotations

import argparse
import os
from typing import Callable

from lmjax.commands import watch


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face Llama (safetensors) <-> lmjax params")
    p.add_argument("direction", choices=["from-hf", "to-hf"])
    p.add_argument("src", help="HF_DIR (from-hf) or a params-only CHECKPOINT_DIR (to-hf)")
    p.add_argument("out", help="OUT_DIR (must be new or empty)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="to-hf: dtype of the written tensors (default: as stored)",
    )
    watch.add_flag(p)  # to-hf, which may run as several processes
    p.set_defaults(func=from_args)


def from_args(args: argparse.Namespace) -> int:
    from lmjax.parallel import distributed

    if args.direction == "from-hf":
        distributed.require_one_process("lmjax convert from-hf", os.environ)
        return from_hf(args.src, args.out)
    distributed.initialize()  # started as several processes, they export together
    with watch.watching(args.watchdog_seconds, watch.rerun_into(args.out)) as expect:
        return to_hf(args.src, args.out, dtype=args.dtype, expect=expect)


def from_hf(hf_dir: str, out_dir: str) -> int:
    """Reads a Hugging Face checkpoint, writes OUT_DIR/params and OUT_DIR/model_config.json,
    one tensor at a time (host memory: about the largest tensor, never the model). One
    process: it uses no devices."""
    from lmjax.checkpoint import params_dir
    from lmjax.convert import hf
    from lmjax.model import transformer

    params_dir.require_new(out_dir)  # before the slow read
    cfg, pieces = hf.read(hf_dir)
    params_dir.save_streamed(cfg, pieces, out_dir)
    print(
        f"wrote {transformer.count_params(cfg):,} parameters ({cfg.n_layers} layers, d_model "
        f"{cfg.d_model}) to {out_dir}/params and {out_dir}/model_config.json"
    )
    return 0


def to_hf(
    source: str,
    out_dir: str,
    dtype: str | None = None,
    expect: Callable[[str], None] = lambda phase: None,
) -> int:
    """Writes a Hugging Face checkpoint of a params directory, of the family its model
    switches name (`dtype`: of the tensors). Started as several processes
    (`distributed.initialize` first), each restores its shards and process 0 writes the files.
    `expect(phase)` is told of each phase (the watchdog's)."""
    from lmjax.checkpoint import params_dir
    from lmjax.convert import families, hf
    from lmjax.model import transformer
    from lmjax.parallel import distributed

    hf.require_empty(out_dir)  # before the slow read
    expect("the restore of the params")
    cfg, params = params_dir.load(source)
    expect("the Hugging Face files' write")
    hf.save(cfg, params, out_dir, dtype=dtype)
    architecture = families.of_config(cfg).architecture
    if distributed.is_primary():
        print(
            f"wrote a {architecture} checkpoint ({transformer.count_params(cfg):,} parameters) "
            f"to {out_dir}"
        )
    return 0
