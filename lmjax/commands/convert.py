"""`lmjax convert from-hf|to-hf`: Hugging Face safetensors (Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3) <-> lmjax params directories."""

from __future__ import annotations

from lmjax.checkpoint import params_dir
from lmjax.convert import families, hf
from lmjax.model import transformer


def from_hf(hf_dir: str, out_dir: str) -> int:
    """Reads a Hugging Face checkpoint, writes OUT_DIR/params and OUT_DIR/model_config.json."""
    params_dir.require_new(out_dir)  # before the slow read
    cfg, params = hf.load(hf_dir)
    params_dir.save(cfg, params, out_dir)
    print(
        f"wrote {transformer.count_params(cfg):,} parameters ({cfg.n_layers} layers, d_model "
        f"{cfg.d_model}) to {out_dir}/params and {out_dir}/model_config.json"
    )
    return 0


def to_hf(source: str, out_dir: str, dtype: str | None = None) -> int:
    """Writes a Hugging Face checkpoint of a params directory, of the family its model
    switches name (`dtype`: of the tensors)."""
    hf.require_empty(out_dir)  # before the slow read
    cfg, params = params_dir.load(source)
    hf.save(cfg, params, out_dir, dtype=dtype)
    architecture = families.of_config(cfg).architecture
    print(
        f"wrote a {architecture} checkpoint ({transformer.count_params(cfg):,} parameters) "
        f"to {out_dir}"
    )
    return 0
