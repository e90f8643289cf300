"""Peak host memory of `lmjax convert from-hf`, streamed, against reading the whole model
first (`hf.load` then `params_dir.save`, the path before streaming), for the README.

Writes a random Llama-shaped HF checkpoint (float32, one safetensors file per layer) into a
temporary directory, then converts it in fresh processes, one per way, each reporting its
own peak RSS (`ru_maxrss`), and a process that only imports the same modules (the floor):

    PYTHONPATH=. python scripts/measure_from_hf_memory.py --layers 8 --d-model 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import save_file

RUN = """
import resource, sys
from lmjax.checkpoint import params_dir
from lmjax.commands import convert
from lmjax.convert import hf
from orbax.checkpoint._src.serialization import tensorstore_utils
how, src, out = sys.argv[1:]
if how == "streamed":
    convert.from_hf(src, out)
elif how == "in-memory":
    cfg, params = hf.load(src)
    params_dir.save(cfg, params, out)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def write_checkpoint(path: str, layers: int, d: int, vocab: int) -> tuple[int, int]:
    """A random Llama of `layers` layers, width `d`, MLP 4d, one file per layer; returns
    (total bytes, largest tensor's bytes)."""
    rng = np.random.default_rng(0)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": 4 * d,
        "num_hidden_layers": layers,
        "num_attention_heads": d // 64,
        "num_key_value_heads": d // 64,
        "head_dim": 64,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    weight_map, total, largest = {}, 0, 0

    def put(filename, tensors):
        nonlocal total, largest
        save_file(tensors, os.path.join(path, filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))
        total += sum(t.nbytes for t in tensors.values())
        largest = max([largest, *(t.nbytes for t in tensors.values())])

    def normal(*shape):
        return rng.standard_normal(shape, np.float32) * 0.02

    put(
        "outer.safetensors",
        {
            "model.embed_tokens.weight": normal(vocab, d),
            "lm_head.weight": normal(vocab, d),
            "model.norm.weight": np.ones(d, np.float32),
        },
    )
    for i in range(layers):
        p = f"model.layers.{i}."
        put(
            f"layer-{i}.safetensors",
            {
                **{p + f"self_attn.{n}_proj.weight": normal(d, d) for n in "qkvo"},
                p + "mlp.gate_proj.weight": normal(4 * d, d),
                p + "mlp.up_proj.weight": normal(4 * d, d),
                p + "mlp.down_proj.weight": normal(d, 4 * d),
                p + "input_layernorm.weight": np.ones(d, np.float32),
                p + "post_attention_layernorm.weight": np.ones(d, np.float32),
            },
        )
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return total, largest


def peak_mib(how: str, src: str, out: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", RUN, how, src, out], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "hf")
        os.mkdir(src)
        total, largest = write_checkpoint(src, args.layers, args.d_model, args.vocab)
        print(f"checkpoint: {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB")
        print(f"floor (imports only): {peak_mib('none', src, '')} MiB peak RSS")
        for how in ("streamed", "in-memory"):
            rss = peak_mib(how, src, os.path.join(tmp, how))
            print(f"{how}: {rss} MiB peak RSS")


if __name__ == "__main__":
    main()
