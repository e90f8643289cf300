"""One table per Hugging Face model family: its tensor names and how each maps onto an lmjax
parameter, its config.json keys, and the `ModelConfig` switches it implies.

Every family runs on lmjax's one model (lmjax/model/transformer.py); a family differs only
in the switches of `FAMILY_FIELDS` and in the names of its tensors. The mixture-of-experts
families (mixtral, qwen3_moe) name one tensor per layer and expert ("{i}" the layer, "{j}"
the expert), held in lmjax's `moe` stacks. Gemma names its four
norms differently from Llama: its `post_attention_layernorm` normalizes the attention
output (lmjax `attn_post_norm`), and `pre_feedforward_layernorm` is the MLP's input norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from lmjax.config import ConfigError, ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> one lmjax parameter (one layer's slice for the stacks `layers/...`,
    `dense_mlp/...` and `moe/...`, one layer's and expert's for an expert weight).

    `in_axes` is 0 for arrays stored identically on both sides (embeddings, norms; with
    `flat`, HF holds the lmjax array flattened, as a bias [heads * head_dim]). For a Linear
    weight it is how many leading lmjax axes make up the input dimension: the HF array is
    the transpose of the lmjax array flattened to `[prod(in axes), prod(rest)]`.
    """

    hf: str  # "{i}" stands for the layer index, "{j}" for the expert
    path: tuple[str, ...]
    in_axes: int
    flat: bool = False

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF shape for an lmjax (per-layer) shape."""
        if self.in_axes == 0:
            return (math.prod(shape),) if self.flat else shape
        return (math.prod(shape[self.in_axes :]), math.prod(shape[: self.in_axes]))

    def to_lmjax(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return array.reshape(shape) if self.in_axes == 0 else array.T.reshape(shape)

    def to_hf(self, array: np.ndarray) -> np.ndarray:
        if self.in_axes == 0:
            return array.reshape(-1) if self.flat else array
        return array.reshape(math.prod(array.shape[: self.in_axes]), -1).T


def _layer(hf: str, name: str, in_axes: int, flat: bool = False) -> Entry:
    return Entry(f"model.layers.{{i}}.{hf}", ("layers", name), in_axes, flat)


def _moe(hf: str, name: str) -> Entry:
    return Entry(f"model.layers.{{i}}.{hf}", ("moe", name), 1)


_EMBED = Entry("model.embed_tokens.weight", ("embed",), 0)
_ATTENTION = (
    _layer("self_attn.q_proj.weight", "wq", 1),
    _layer("self_attn.k_proj.weight", "wk", 1),
    _layer("self_attn.v_proj.weight", "wv", 1),
    _layer("self_attn.o_proj.weight", "wo", 2),
)
_MLP = (
    _layer("mlp.gate_proj.weight", "w_gate", 1),
    _layer("mlp.up_proj.weight", "w_up", 1),
    _layer("mlp.down_proj.weight", "w_down", 1),
)
_HEAD = (
    Entry("model.norm.weight", ("final_norm",), 0),
    Entry("lm_head.weight", ("unembed",), 1),  # absent when the embeddings are tied
)
_QK_NORMS = (
    _layer("self_attn.q_norm.weight", "q_norm", 0),
    _layer("self_attn.k_norm.weight", "k_norm", 0),
)
LLAMA_TABLE = (
    _EMBED,
    _layer("input_layernorm.weight", "attn_norm", 0),
    *_ATTENTION,
    _layer("post_attention_layernorm.weight", "mlp_norm", 0),
    *_MLP,
    *_HEAD,
)
QWEN2_TABLE = LLAMA_TABLE + tuple(
    _layer(f"self_attn.{x}_proj.bias", f"{x}_bias", 0, flat=True) for x in "qkv"
)
GEMMA_TABLE = (
    _EMBED,
    _layer("input_layernorm.weight", "attn_norm", 0),
    *_ATTENTION,
    _layer("post_attention_layernorm.weight", "attn_post_norm", 0),
    _layer("pre_feedforward_layernorm.weight", "mlp_norm", 0),
    _layer("post_feedforward_layernorm.weight", "mlp_post_norm", 0),
    *_MLP,
    *_HEAD,
)

_LLAMA_ATTENTION_NORMS = (
    _EMBED,
    _layer("input_layernorm.weight", "attn_norm", 0),
    *_ATTENTION,
    _layer("post_attention_layernorm.weight", "mlp_norm", 0),
    *_HEAD,
)
MIXTRAL_TABLE = _LLAMA_ATTENTION_NORMS + (
    _moe("block_sparse_moe.gate.weight", "router"),
    _moe("block_sparse_moe.experts.{j}.w1.weight", "w_gate"),
    _moe("block_sparse_moe.experts.{j}.w3.weight", "w_up"),
    _moe("block_sparse_moe.experts.{j}.w2.weight", "w_down"),
)
QWEN3_MOE_TABLE = (
    _LLAMA_ATTENTION_NORMS
    + _QK_NORMS
    + (
        _moe("mlp.gate.weight", "router"),
        _moe("mlp.experts.{j}.gate_proj.weight", "w_gate"),
        _moe("mlp.experts.{j}.up_proj.weight", "w_up"),
        _moe("mlp.experts.{j}.down_proj.weight", "w_down"),
    )
)

# The ModelConfig fields in which families differ; a family fixes each (`switches`), reads
# it from config.json (`keys`) or leaves it at its default.
FAMILY_FIELDS = (
    "qkv_bias",
    "qk_norm",
    "norm_offset",
    "scale_embeddings",
    "mlp_activation",
    "post_norms",
    "sliding_window",
    "global_every",
    "rope_local_theta",
    "attn_softcap",
    "final_softcap",
    "query_pre_attn_scalar",
    "moe_experts",
    "moe_top_k",
    "moe_router",
    "moe_routed_scale",
    "moe_d_mlp",
    "moe_shared_d_mlp",
    "moe_first_dense_layers",
    "moe_every",
)
_GEMMA_SWITCHES = (
    ("norm_offset", True),
    ("scale_embeddings", True),
    ("mlp_activation", "gelu_tanh"),
    ("post_norms", True),
)
_GEMMA_KEYS = (
    ("sliding_window", "sliding_window"),
    ("query_pre_attn_scalar", "query_pre_attn_scalar"),
    ("attn_logit_softcapping", "attn_softcap"),
    ("final_logit_softcapping", "final_softcap"),
)
_GEMMA_DEFAULTS = (("head_dim", 256), ("rms_norm_eps", 1e-6), ("tie_word_embeddings", True))
_GEMMA_REQUIRED = (
    ("hidden_activation", "gelu_pytorch_tanh", "a GeGLU MLP with tanh-approximated GELU"),
    ("attention_bias", False, "attention without biases"),
)
_SILU_REQUIRED = (("hidden_act", "silu", "a SwiGLU MLP with silu"),)
_NO_SLIDING = (("use_sliding_window", False, "full attention in every layer"),)


@dataclasses.dataclass(frozen=True)
class Family:
    """A Hugging Face model family.

    switches: ModelConfig fields the family fixes. keys: (config.json key, ModelConfig
    field) read and written beside the shared ones; a null value reads as 0 (off).
    defaults: config.json values assumed where a key is absent (the family's HF defaults).
    required: (key, value, what it means) that config.json must hold (or lack); written too.
    router_key: a config.json boolean that picks the MoE router: true softmax_topk_renorm,
    false softmax_topk ("": the switches fix it); no family has the sigmoid router.
    """

    model_type: str
    architecture: str
    table: tuple[Entry, ...]
    switches: tuple[tuple[str, Any], ...] = ()
    keys: tuple[tuple[str, str], ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    required: tuple[tuple[str, Any, str], ...] = _SILU_REQUIRED
    router_key: str = ""

    def fixed(self) -> dict[str, Any]:
        """The FAMILY_FIELDS values every model of this family has."""
        read = {field for _, field in self.keys} | ({"moe_router"} if self.router_key else set())
        fixed = {f: getattr(ModelConfig, f) for f in FAMILY_FIELDS if f not in read}
        return {**fixed, **dict(self.switches)}


FAMILIES = (
    Family(
        "llama",
        "LlamaForCausalLM",
        LLAMA_TABLE,
        required=_SILU_REQUIRED
        + (
            ("attention_bias", False, "attention without biases"),
            ("mlp_bias", False, "an MLP without biases"),
        ),
    ),
    Family(
        "mistral",
        "MistralForCausalLM",
        LLAMA_TABLE,
        keys=(("sliding_window", "sliding_window"),),
        defaults=(("sliding_window", 4096),),
    ),
    Family(
        "qwen2",
        "Qwen2ForCausalLM",
        QWEN2_TABLE,
        switches=(("qkv_bias", True),),
        required=_SILU_REQUIRED + _NO_SLIDING,
    ),
    Family(
        "qwen3",
        "Qwen3ForCausalLM",
        LLAMA_TABLE + _QK_NORMS,
        switches=(("qk_norm", True),),
        defaults=(("head_dim", 128),),
        required=_SILU_REQUIRED
        + _NO_SLIDING
        + (("attention_bias", False, "attention without biases"),),
    ),
    Family(
        "gemma2",
        "Gemma2ForCausalLM",
        GEMMA_TABLE,
        switches=_GEMMA_SWITCHES + (("global_every", 2),),
        keys=_GEMMA_KEYS,
        defaults=_GEMMA_DEFAULTS
        + (
            ("sliding_window", 4096),
            ("query_pre_attn_scalar", 256),
            ("attn_logit_softcapping", 50.0),
            ("final_logit_softcapping", 30.0),
        ),
        required=_GEMMA_REQUIRED,
    ),
    Family(
        "gemma3_text",
        "Gemma3ForCausalLM",
        GEMMA_TABLE + _QK_NORMS,
        switches=_GEMMA_SWITCHES + (("qk_norm", True),),
        keys=_GEMMA_KEYS
        + (
            ("sliding_window_pattern", "global_every"),
            ("rope_local_base_freq", "rope_local_theta"),
        ),
        defaults=_GEMMA_DEFAULTS
        + (
            ("sliding_window", 4096),
            ("sliding_window_pattern", 6),
            ("rope_local_base_freq", 10000.0),
            ("query_pre_attn_scalar", 256),
        ),
        required=_GEMMA_REQUIRED,
    ),
    Family(
        "mixtral",
        "MixtralForCausalLM",
        MIXTRAL_TABLE,
        switches=(("moe_router", "softmax_topk_renorm"),),
        keys=(
            ("num_local_experts", "moe_experts"),
            ("num_experts_per_tok", "moe_top_k"),
            ("sliding_window", "sliding_window"),
        ),
        defaults=(("num_local_experts", 8), ("num_experts_per_tok", 2)),
    ),
    Family(
        "qwen3_moe",
        "Qwen3MoeForCausalLM",
        QWEN3_MOE_TABLE,
        switches=(("qk_norm", True),),
        keys=(
            ("num_experts", "moe_experts"),
            ("num_experts_per_tok", "moe_top_k"),
            ("moe_intermediate_size", "moe_d_mlp"),
        ),
        defaults=(("head_dim", 128), ("num_experts", 128), ("num_experts_per_tok", 8)),
        required=_SILU_REQUIRED
        + _NO_SLIDING
        + (
            ("attention_bias", False, "attention without biases"),
            ("decoder_sparse_step", 1, "an MoE MLP in every layer"),
            ("mlp_only_layers", [], "an MoE MLP in every layer"),
        ),
        router_key="norm_topk_prob",
    ),
)
_BY_TYPE = {f.model_type: f for f in FAMILIES}


def by_model_type(model_type: Any) -> Family:
    """The family of a config.json `model_type`; a ConfigError naming those lmjax reads."""
    if model_type not in _BY_TYPE:
        hint = (
            ' (a multimodal Gemma 3: convert its "text_config" with model_type "gemma3_text")'
            if model_type == "gemma3"
            else ""
        )
        raise ConfigError(
            f"config.json has model_type={model_type!r}{hint}; lmjax converts "
            f"{', '.join(repr(t) for t in _BY_TYPE)} checkpoints"
        )
    return _BY_TYPE[model_type]


def of_config(cfg: ModelConfig) -> Family:
    """The first family (in FAMILIES order) whose fixed switches `cfg` has (a router_key
    reads only the softmax routers)."""
    softmax = cfg.moe_router in ("softmax_topk", "softmax_topk_renorm")
    for family in FAMILIES:
        if softmax and all(getattr(cfg, f) == v for f, v in family.fixed().items()):
            return family
    switches = {
        f: getattr(cfg, f) for f in FAMILY_FIELDS if getattr(cfg, f) != getattr(ModelConfig, f)
    }
    raise ConfigError(
        f"no Hugging Face family has the model switches {switches}: to-hf writes "
        f"{', '.join(f.model_type for f in FAMILIES)} checkpoints; change those model fields"
    )
