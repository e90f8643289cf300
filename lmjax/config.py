"""Typed run configuration: one frozen dataclass per subsystem.

Each subsystem function takes only its own part (`ModelConfig`, `DataConfig`, ...);
`Config` merely groups them for the command line, experiments and `config.json`.
`apply_overrides` parses `section.field=value` strings to the field's type and
`validate` checks cross-field constraints before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import types
import typing
from typing import Any

REMAT_POLICIES = ("none", "full", "save_dots", "save_attn")
ATTENTION_IMPLS = ("auto", "xla", "pallas_gpu", "cudnn", "splash")
MATMUL_IMPLS = ("auto", "xla", "row_major")  # lmjax/model/matmul.py
# The grouped matmul of dropless MoE dispatch (lmjax/model/moe.py): "auto" is megablox on TPU
# and ragged_dot elsewhere; megablox off TPU runs its kernel in Pallas interpret mode (tests).
MOE_MATMUL_IMPLS = ("auto", "ragged_dot", "megablox")
SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("float32", "bfloat16", "float16")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama, Qwen, Mistral), GeGLU (Gemma)
ROPE_SCALING_TYPES = ("llama3", "linear")
# How a mixture-of-experts router weights its top-k experts (lmjax/model/moe.py):
# "softmax_topk": softmax over all experts, the top k probabilities as they are (Qwen3-MoE with
# norm_topk_prob=False); "softmax_topk_renorm": the same, renormalized to sum to 1 per token
# (Mixtral; Qwen3-MoE with norm_topk_prob=True); "sigmoid_topk_bias" (DeepSeek-V3): sigmoid
# scores, the top k of scores + a per-expert bias chosen (the bias is set by
# optim.moe_bias_rate, not trained), their unbiased scores renormalized to sum to 1.
MOE_ROUTERS = ("softmax_topk", "softmax_topk_renorm", "sigmoid_topk_bias")


class ConfigError(ValueError):
    """A configuration problem, phrased so that the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    d_mlp: int = 1408
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    # Llama-3.1 frequency scaling; rope_scaling_factor 0 turns it off.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    # "llama3": Llama-3.1 frequency bands; "linear": every frequency / rope_scaling_factor.
    rope_scaling_type: str = "llama3"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "bfloat16"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"
    remat: str = "full"
    attention: str = "auto"
    # How projections run their backward matmuls (lmjax/model/matmul.py): auto, xla, row_major.
    matmul: str = "auto"
    scan_layers: bool = True
    # >0: the loss projects to the vocabulary in sequence chunks of this many tokens, so
    # full [batch, seq, vocab] float32 logits never exist at once (lmjax/model/cross_entropy.py).
    logits_chunk: int = 0
    # Model-family switches on the same blocks (Qwen, Mistral, Gemma: lmjax/convert/families.py).
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: bool = False  # every norm scales by (1 + weight), weights start at 0 (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(d_model) (Gemma)
    mlp_activation: str = "silu"  # the gate's activation: silu (SwiGLU) or gelu_tanh (GeGLU)
    post_norms: bool = False  # norms on the attention and MLP outputs before each residual add
    # >0: local layers attend to the sliding_window most recent positions (self included).
    sliding_window: int = 0
    # With sliding_window: layers n-1, 2n-1, ... are global (Gemma 2: 2, Gemma 3: 6); 0: all local.
    global_every: int = 0
    rope_local_theta: float = 0.0  # >0: RoPE base of local layers, unscaled (Gemma 3)
    attn_softcap: float = 0.0  # >0: attention scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float = 0.0  # >0: the same on the output logits (Gemma 2)
    query_pre_attn_scalar: float = 0.0  # >0: scores scaled by its -1/2 power, not head_dim's
    # Mixture of experts (lmjax/model/moe.py): moe_experts > 0 replaces the MLP of the MoE
    # layers by moe_experts SwiGLU experts of width moe_d_mlp, moe_top_k of them per token.
    moe_experts: int = 0  # 0: a dense model
    moe_top_k: int = 2
    moe_router: str = "softmax_topk_renorm"  # MOE_ROUTERS
    moe_routed_scale: float = 1.0  # multiplies the routed experts' weights (DeepSeek-V3: 2.5)
    moe_d_mlp: int = 0  # each expert's hidden width; 0: d_mlp
    moe_shared_d_mlp: int = 0  # >0: an always-on shared SwiGLU expert of this width
    moe_first_dense_layers: int = 0  # the first layers keep a dense MLP (DeepSeek)
    moe_every: int = 1  # after those, every n-th layer is MoE (layer i: (i + 1) % n == 0)
    # 0: dropless (tokens grouped by expert, a grouped matmul); >0: each expert takes at most
    # ceil(factor x tokens x top_k / experts) tokens per batch, fixed shapes, the rest dropped.
    moe_capacity_factor: float = 0.0
    moe_matmul: str = "auto"  # MOE_MATMUL_IMPLS: the dropless grouped matmul


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh. One of data/fsdp/expert/tensor may be -1: it takes the remaining devices."""

    data: int = 1
    fsdp: int = -1
    # Expert parallelism: an MoE layer's experts split over this axis, tokens exchanged with
    # all-to-all (lmjax/model/moe.py); it also splits the batch, as data does. Within a slice.
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1  # across slices (multi-slice TPU) or across hosts on a DCN
    dcn_fsdp: int = 1
    # Extra logical-axis rules "logical=mesh_axis[+mesh_axis]" overriding the defaults,
    # e.g. ("mlp=tensor", "embed=fsdp"). An empty right side replicates that axis.
    rules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Where documents come from; `lmjax data prepare` (or the first `lmjax train`) tokenizes
    # them once into a store under `store_dir` that training reads (lmjax/data/prepare.py).
    # "packaged": the Shakespeare slice shipped in the package.
    # "text": local or gs:// `text_files` (comma-separated globs of .txt/.jsonl/.jsonl.gz).
    # "tfds": a registered TFDS dataset `tfds_name` read from `data_dir`.
    # "synthetic": seeded random tokens, for benchmarks; nothing to prepare.
    source: str = "packaged"
    tfds_name: str = ""
    data_dir: str = ""  # TFDS data_dir of the tfds source
    text_files: str = ""
    text_feature: str = "text"  # JSON key (.jsonl) or TFDS feature holding the text
    train_split: str = "train"  # tfds source only; local text always has train/validation
    eval_split: str = "validation"  # tfds source only
    validation_fraction: float = 0.05  # local text: documents held out, chosen by hash
    # The store's name (default: the source kind), e.g. "web"; data.mixture refers to it.
    name: str = ""
    # Train on several prepared stores with weights, e.g. "web:0.7,code:0.2,books:0.1": each
    # NAME is a store prepared (under store_dir, with this run's tokenizer) with data.name=NAME.
    mixture: str = ""
    bad_utf8: str = "error"  # "error": fail naming file and byte; "skip": skip such documents
    store_dir: str = ""  # prepared stores (local or gs://); empty: WORKDIR/data
    prepare_timeout_s: float = 3600.0  # how long other processes wait for process 0 to prepare
    tokenizer: str = ""  # a sentencepiece .model; empty: train one into the workdir
    tokenizer_vocab_size: int = 4096
    batch_size: int = 8  # global batch, in sequences
    seq_len: int = 512
    # True: each document piece in a row is its own segment (attention stays inside it,
    # positions restart, no target crosses into the next document). False: rows are plain
    # windows of the token stream (one segment, every target trained).
    packing: bool = True
    shuffle: bool = True  # a fresh seeded permutation of the training windows every epoch
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_steps: int = 0  # 0: decay over run.steps
    min_lr_ratio: float = 0.1
    wsd_decay_fraction: float = 0.2  # warmup-stable-decay: final fraction spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    clip_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # microbatches per step, accumulated inside the jitted step
    z_loss: float = 0.0
    # Mixture-of-experts terms of the objective (per MoE layer, summed over layers): the
    # load-balancing loss (experts x sum_e tokens_e / tokens x mean router prob_e; top_k when
    # balanced) and the router z-loss (mean squared logsumexp of the router logits).
    moe_aux_loss: float = 0.0
    moe_router_z_loss: float = 0.0
    # sigmoid_topk_bias router: after each step every MoE layer's router_bias moves by
    # moe_bias_rate x sign(mean load - load) per expert (DeepSeek-V3's gamma, 0.001).
    moe_bias_rate: float = 0.0
    # With grad_accum > 1, False: the balance loss is each microbatch's (averaged); True: the
    # whole step's, exactly as without accumulation, at the cost of a forward pass over the
    # step's microbatches that first counts each expert's copies (trainer.step_expert_counts).
    moe_balance_over_step: bool = False


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    every_minutes: float = 0.0  # 0: off
    keep: int = 3
    keep_every: int = 0  # 0: off; otherwise steps divisible by it are kept forever
    async_save: bool = True
    # A non-finite loss or gradient: "stop", "skip" (keep the old params) or "rewind" (back to
    # the newest checkpoint, the step's batch skipped; lmjax/train/hooks.py LossGuard).
    on_nonfinite: str = "stop"
    # >1: a loss above this multiple of the mean of the last 20 steps rewinds too; 0: off.
    spike_factor: float = 0.0
    max_rewinds: int = 3  # rewinds before the run stops instead
    # True: when checkpoints exist but none can be read, start from scratch instead of
    # stopping (the unreadable steps are moved to checkpoints/unreadable/ by the first save).
    allow_fresh: bool = False
    # The workdir's lease (lmjax/checkpoint/lease.py) is renewed every lease_timeout_s / 6 s;
    # one not renewed for lease_timeout_s is taken over by the next run on the workdir.
    lease_timeout_s: float = 60.0
    # Fields a resume may change although they are refused by default, e.g.
    # ("data.batch_size",) for a batch-size ramp or ("data.seq_len", "model.rope_theta") for
    # a context extension: the data position carries over (lmjax/data/pipeline.py). One of
    # RESUME_ACCEPTABLE; a field not changed is ignored, so the same command resumes again.
    accept_changes: tuple[str, ...] = ()


RESUME_ACCEPTABLE = (
    "data.batch_size",
    "data.seq_len",
    "model.rope_theta",
    "model.rope_scaling_factor",
    "model.rope_low_freq_factor",
    "model.rope_high_freq_factor",
    "model.rope_original_max_len",
    "model.rope_scaling_type",
    "model.rope_local_theta",
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    steps: int = 1000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    sample_tokens: int = 0  # >0: print a greedy sample of this many tokens after training
    sample_prompt: str = "ROMEO:"
    # Persistent compilation cache (lmjax/train/compile_cache.py): "auto", "" (off), a path or gs://.
    compile_cache_dir: str = "auto"
    # "A:B": a jax.profiler trace of steps A..B-1 into WORKDIR/tensorboard/plugins/profile/.
    profile_steps: str = ""
    profile_all_processes: bool = True  # False: process 0 only
    # Weights & Biases project to log to as well (lmjax/observe/wandb_log.py); "": TensorBoard only.
    wandb_project: str = ""
    # Progress watchdog (lmjax/train/watchdog.py): no step, save or evaluation finished within
    # max(watchdog_min_seconds, watchdog_factor x the longest recent one) dumps every thread's
    # stack and exits 75; watchdog_startup_seconds covers each set-up phase (at least
    # data.prepare_timeout_s for the tokenizer and stores), the first step and the first of
    # each kind (compilation), and the end of the run (the sample, the last commit).
    # watchdog_factor=0: off.
    watchdog_factor: float = 10.0
    watchdog_min_seconds: float = 300.0
    watchdog_startup_seconds: float = 3600.0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    run: RunConfig = RunConfig()


# ---------------------------------------------------------------- overrides


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _parse_value(text: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, inner[0], key)
    if origin is tuple:
        items = [s.strip() for s in text.split(",") if s.strip()] if text.strip() else []
        return tuple(_parse_value(s, args[0], key) for s in items)
    if typ is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if typ is int:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
        if value != int(value):
            raise ConfigError(f"{key}={text!r}: expected an integer")
        return int(value)
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    return text


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def parse_sweep(text: str) -> tuple[str, tuple[str, ...]]:
    """`--sweep` "model.remat=full,none" -> ("model.remat", ("full", "none"))."""
    key, sep, values = text.partition("=")
    choices = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not key.strip() or not choices:
        raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2, e.g. model.remat=full,none")
    return key.strip(), choices


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Returns `config` with each `section.field=value` applied, parsed to the field type."""
    sections = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. run.steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        if "." not in key:
            raise ConfigError(
                f"--set {key}: expected section.field; sections are {', '.join(sections)}."
            )
        section, field = key.split(".", 1)
        if section not in sections:
            raise ConfigError(
                f"--set {key}: unknown section {section!r}; valid sections: "
                f"{', '.join(sections)}.{_nearest(section, list(sections))}"
            )
        types_ = _field_types(type(sections[section]))
        if field not in types_:
            valid = sorted(types_)
            raise ConfigError(
                f"--set {key}: unknown field {field!r} of {section}.{_nearest(field, valid)} "
                f"Valid keys: {', '.join(section + '.' + v for v in valid)}"
            )
        value = _parse_value(text, types_[field], key)
        sections[section] = dataclasses.replace(sections[section], **{field: value})
    return Config(**sections)


# ---------------------------------------------------------------- validation


def validate(config: Config) -> Config:
    """Checks every field and the constraints between fields before anything is compiled;
    raises one ConfigError listing every problem, each naming the field and the fix.

    What needs the tokenizer or the mesh is checked where those exist: `validate_tokenizer`,
    `sharding.process_rows`.
    """
    problems: list[str] = []

    def need(cond: bool, message: str) -> None:
        if not cond:
            problems.append(message)

    _check_types(config, need)
    if not problems:  # the value checks below compare numbers and strings
        for check in (
            _check_model,
            _check_mesh,
            _check_data,
            _check_optim,
            _check_checkpoint,
            _check_run,
        ):
            check(config, need)
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def _check_types(config: Config, need) -> None:
    """Every field holds its declared type (an experiment file may set anything); numbers
    are finite."""
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        for name, typ in _field_types(type(part)).items():
            value, key = getattr(part, name), f"{section.name}.{name}"
            if typ is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                need(ok and math.isfinite(value), f"{key}={value!r} must be a finite number.")
            elif typ is int:
                need(
                    isinstance(value, int) and not isinstance(value, bool),
                    f"{key}={value!r} must be an integer.",
                )
            elif typing.get_origin(typ) is tuple:
                need(
                    isinstance(value, tuple) and all(isinstance(v, str) for v in value),
                    f"{key}={value!r} must be a tuple of strings.",
                )
            else:
                need(isinstance(value, typ), f"{key}={value!r} must be a {typ.__name__}.")


def _check_model(config: Config, need) -> None:
    m, d = config.model, config.data
    for name in (
        "vocab_size",
        "d_model",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "head_dim",
        "d_mlp",
        "max_seq_len",
        "rope_theta",
        "norm_eps",
        "init_std",
    ):
        need(getattr(m, name) > 0, f"model.{name} must be positive (got {getattr(m, name)}).")
    if m.n_heads > 0 and m.n_kv_heads > 0:
        need(
            m.n_heads % m.n_kv_heads == 0,
            f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads}: "
            "choose n_kv_heads among the divisors of n_heads (1 gives multi-query attention).",
        )
    need(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for RoPE.")
    need(
        m.rope_scaling_factor >= 0,
        f"model.rope_scaling_factor={m.rope_scaling_factor} must be 0 (off) or positive.",
    )
    if m.rope_scaling_factor > 0:
        need(
            0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
            f"model.rope_low_freq_factor={m.rope_low_freq_factor} and rope_high_freq_factor="
            f"{m.rope_high_freq_factor} must satisfy 0 < low < high (Llama-3.1: 1 and 4).",
        )
        need(
            m.rope_original_max_len > 0,
            f"model.rope_original_max_len={m.rope_original_max_len} must be positive.",
        )
    _check_families(m, need)
    _check_moe(m, need)
    need(m.dtype in DTYPES, f"model.dtype={m.dtype!r}: choose one of {DTYPES}.")
    need(m.param_dtype in DTYPES, f"model.param_dtype={m.param_dtype!r}: choose one of {DTYPES}.")
    need(m.remat in REMAT_POLICIES, f"model.remat={m.remat!r}: choose one of {REMAT_POLICIES}.")
    need(m.matmul in MATMUL_IMPLS, f"model.matmul={m.matmul!r}: choose one of {MATMUL_IMPLS}.")
    need(
        m.attention in ATTENTION_IMPLS,
        f"model.attention={m.attention!r}: choose one of {ATTENTION_IMPLS}.",
    )
    need(
        m.logits_chunk >= 0 and (m.logits_chunk == 0 or d.seq_len % m.logits_chunk == 0),
        f"model.logits_chunk={m.logits_chunk} must be 0 (off) or divide data.seq_len={d.seq_len}.",
    )
    need(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}: "
        "raise model.max_seq_len or lower data.seq_len.",
    )


def _check_families(m: ModelConfig, need) -> None:
    """The model-family switches: each value in range, and no switch without what it acts on."""
    need(
        m.rope_scaling_type in ROPE_SCALING_TYPES,
        f"model.rope_scaling_type={m.rope_scaling_type!r}: choose one of {ROPE_SCALING_TYPES}.",
    )
    need(
        m.mlp_activation in MLP_ACTIVATIONS,
        f"model.mlp_activation={m.mlp_activation!r}: choose one of {MLP_ACTIVATIONS}.",
    )
    for name in (
        "sliding_window",
        "global_every",
        "rope_local_theta",
        "attn_softcap",
        "final_softcap",
        "query_pre_attn_scalar",
    ):
        value = getattr(m, name)
        need(value >= 0, f"model.{name}={value} must be 0 (off) or positive.")
    for name in ("global_every", "rope_local_theta"):
        need(
            getattr(m, name) <= 0 or m.sliding_window > 0,
            f"model.{name}={getattr(m, name)} acts on local layers, and there are none: set "
            f"model.sliding_window (e.g. 4096) or model.{name}=0.",
        )
    need(
        m.attention != "cudnn" or m.attn_softcap <= 0,
        "model.attention=cudnn implements no attention soft-capping: use "
        "model.attention=pallas_gpu or xla, or auto (which picks pallas_gpu on GPUs).",
    )


def _check_moe(m: ModelConfig, need) -> None:
    """The mixture-of-experts fields: in range, and consistent with each other."""
    need(
        m.moe_experts >= 0,
        f"model.moe_experts={m.moe_experts} must be 0 (a dense model) or positive.",
    )
    if m.moe_experts <= 0:
        return
    need(
        1 <= m.moe_top_k <= m.moe_experts,
        f"model.moe_top_k={m.moe_top_k} must lie in [1, model.moe_experts={m.moe_experts}].",
    )
    need(
        m.moe_router in MOE_ROUTERS,
        f"model.moe_router={m.moe_router!r}: choose one of {MOE_ROUTERS}.",
    )
    for name in ("moe_d_mlp", "moe_shared_d_mlp", "moe_first_dense_layers", "moe_capacity_factor"):
        value = getattr(m, name)
        need(value >= 0, f"model.{name}={value} must be 0 or positive.")
    need(
        m.moe_matmul in MOE_MATMUL_IMPLS,
        f"model.moe_matmul={m.moe_matmul!r}: choose one of {MOE_MATMUL_IMPLS}.",
    )
    need(
        m.moe_matmul != "megablox" or m.dtype in ("float32", "bfloat16"),
        f"model.moe_matmul=megablox takes float32 or bfloat16, not model.dtype={m.dtype!r}: "
        "set model.moe_matmul=ragged_dot or another dtype.",
    )
    need(m.moe_every >= 1, f"model.moe_every={m.moe_every} must be at least 1 (1: every layer).")
    need(m.moe_routed_scale > 0, f"model.moe_routed_scale={m.moe_routed_scale} must be positive.")
    need(
        any(moe_layer(m, i) for i in range(m.n_layers)),
        f"model.moe_first_dense_layers={m.moe_first_dense_layers} and model.moe_every="
        f"{m.moe_every} leave no MoE layer among the {m.n_layers}: lower them, or set "
        "model.moe_experts=0 for a dense model.",
    )
    need(
        m.mlp_activation == "silu",
        f"model.mlp_activation={m.mlp_activation!r}: experts are SwiGLU; use silu.",
    )


def moe_layer(m: ModelConfig, i: int) -> bool:
    """Whether layer i (0-based) has a mixture-of-experts MLP: after the first
    moe_first_dense_layers, every moe_every-th layer (all of them with moe_every 1)."""
    j = i - m.moe_first_dense_layers
    return m.moe_experts > 0 and j >= 0 and (j + 1) % max(m.moe_every, 1) == 0


def _check_mesh(config: Config, need) -> None:
    mesh = config.mesh
    sizes = {"data": mesh.data, "fsdp": mesh.fsdp, "expert": mesh.expert, "tensor": mesh.tensor}
    need(
        all(v >= 1 or v == -1 for v in sizes.values())
        and sum(v == -1 for v in sizes.values()) <= 1,
        f"mesh sizes {sizes} must be positive, with at most one -1 (the remaining devices).",
    )
    need(
        mesh.dcn_data >= 1 and mesh.dcn_fsdp >= 1,
        f"mesh.dcn_data={mesh.dcn_data} and mesh.dcn_fsdp={mesh.dcn_fsdp} must be at least 1.",
    )
    for rule in mesh.rules:
        need(
            "=" in rule and rule.split("=", 1)[0].strip() != "",
            f"mesh.rules entry {rule!r} must read logical=mesh_axis[+mesh_axis], e.g. mlp=tensor.",
        )


def _check_data(config: Config, need) -> None:
    d, m, o = config.data, config.model, config.optim
    need(d.seq_len > 1, f"data.seq_len={d.seq_len} must be at least 2.")
    need(d.batch_size > 0, f"data.batch_size={d.batch_size} must be positive.")
    if d.batch_size > 0 and o.grad_accum > 0:
        need(
            d.batch_size % o.grad_accum == 0,
            f"data.batch_size={d.batch_size} must be divisible by optim.grad_accum={o.grad_accum}.",
        )
    need(
        d.source in ("packaged", "text", "tfds", "synthetic"),
        f"data.source={d.source!r}: choose packaged, text, tfds or synthetic.",
    )
    need(
        d.source != "tfds" or d.tfds_name,
        "data.source=tfds needs data.tfds_name (e.g. c4/en:3.1.0) and data.data_dir.",
    )
    need(
        not d.mixture or d.tokenizer,
        "data.mixture needs data.tokenizer: every store of a mixture is prepared with it.",
    )
    need(d.bad_utf8 in ("error", "skip"), f"data.bad_utf8={d.bad_utf8!r}: choose error or skip.")
    need(
        d.source != "text" or d.text_files,
        "data.source=text needs data.text_files (a glob of .txt or .jsonl files).",
    )
    need(
        0.0 <= d.validation_fraction < 1.0,
        f"data.validation_fraction={d.validation_fraction} must lie in [0, 1).",
    )
    need(
        d.validation_fraction > 0 or d.source not in ("packaged", "text") or d.mixture != "",
        "data.validation_fraction=0 holds out no document, but every run evaluates on the "
        "validation split (run.eval_batches >= 1): set a fraction such as 0.05.",
    )
    need(
        d.seed >= 0 or d.source != "synthetic",
        f"data.seed={d.seed} must not be negative with data.source=synthetic (it seeds numpy's "
        "generator).",
    )
    need(
        d.prepare_timeout_s >= 0,
        f"data.prepare_timeout_s={d.prepare_timeout_s} must not be negative.",
    )
    need(
        d.tokenizer_vocab_size > 0,
        f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} must be positive.",
    )
    if d.source != "synthetic" and not d.tokenizer:  # the run trains this tokenizer
        need(
            d.tokenizer_vocab_size <= m.vocab_size,
            f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} exceeds model.vocab_size="
            f"{m.vocab_size}: ids past the embedding table would train into NaNs. Lower "
            "data.tokenizer_vocab_size or raise model.vocab_size.",
        )


def _check_optim(config: Config, need) -> None:
    o = config.optim
    need(o.schedule in SCHEDULES, f"optim.schedule={o.schedule!r}: choose one of {SCHEDULES}.")
    for name in (
        "lr",
        "warmup_steps",
        "decay_steps",
        "weight_decay",
        "clip_norm",
        "z_loss",
        "moe_aux_loss",
        "moe_router_z_loss",
        "moe_bias_rate",
    ):
        need(getattr(o, name) >= 0, f"optim.{name}={getattr(o, name)} must not be negative.")
    need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1].")
    need(
        0.0 < o.wsd_decay_fraction <= 1.0,
        f"optim.wsd_decay_fraction={o.wsd_decay_fraction} must lie in (0, 1]: the final "
        "fraction of the run spent decaying.",
    )
    need(
        0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0,
        f"optim.b1={o.b1} and optim.b2={o.b2} must lie in [0, 1).",
    )
    need(o.eps > 0, f"optim.eps={o.eps} must be positive.")
    need(o.grad_accum > 0, f"optim.grad_accum={o.grad_accum} must be positive.")
    need(
        o.moe_bias_rate <= 0 or config.model.moe_router == "sigmoid_topk_bias",
        f"optim.moe_bias_rate={o.moe_bias_rate} moves the router bias of "
        f"model.moe_router='sigmoid_topk_bias', and this model routes with "
        f"{config.model.moe_router!r}: set that router or optim.moe_bias_rate=0.",
    )
    need(
        o.moe_bias_rate <= 0 or config.model.param_dtype == "float32",
        f"optim.moe_bias_rate={o.moe_bias_rate} steps the router bias, which is stored in "
        f"model.param_dtype={config.model.param_dtype!r}, where steps that small round away: "
        "use model.param_dtype=float32.",
    )


def _check_checkpoint(config: Config, need) -> None:
    c = config.checkpoint
    need(
        c.every_steps >= 1,
        f"checkpoint.every_steps={c.every_steps} must be at least 1 (the last step always saves; "
        "a value above run.steps saves only then).",
    )
    need(
        c.every_minutes >= 0,
        f"checkpoint.every_minutes={c.every_minutes} must be 0 (off) or positive.",
    )
    need(c.keep > 0, f"checkpoint.keep={c.keep} must be at least 1.")
    need(c.keep_every >= 0, f"checkpoint.keep_every={c.keep_every} must be 0 (off) or positive.")
    need(
        c.lease_timeout_s > 0,
        f"checkpoint.lease_timeout_s={c.lease_timeout_s} must be positive (60 s is the default).",
    )
    need(
        c.on_nonfinite in ("stop", "skip", "rewind"),
        f"checkpoint.on_nonfinite={c.on_nonfinite!r}: choose stop, skip or rewind.",
    )
    need(
        c.spike_factor == 0 or c.spike_factor > 1,
        f"checkpoint.spike_factor={c.spike_factor} must be 0 (off) or above 1 (a multiple of "
        "the recent mean loss).",
    )
    need(c.max_rewinds >= 0, f"checkpoint.max_rewinds={c.max_rewinds} must be 0 or positive.")
    unknown = sorted(set(c.accept_changes) - set(RESUME_ACCEPTABLE))
    need(
        not unknown,
        f"checkpoint.accept_changes: {unknown} cannot change on a resume; the fields that can "
        f"are {', '.join(RESUME_ACCEPTABLE)} (others change the parameters or the tokenizer: "
        "start a new workdir, or load only the params with --init-from).",
    )


def _check_run(config: Config, need) -> None:
    r, m = config.run, config.model
    need(r.steps > 0, f"run.steps={r.steps} must be positive.")
    need(r.log_every > 0, f"run.log_every={r.log_every} must be positive.")
    need(
        r.eval_every >= 0, f"run.eval_every={r.eval_every} must be 0 (only at the end) or positive."
    )
    need(
        r.eval_batches >= 1,
        f"run.eval_batches={r.eval_batches} must be at least 1 (every run evaluates at its end).",
    )
    need(
        0 <= r.sample_tokens < m.max_seq_len,
        f"run.sample_tokens={r.sample_tokens} must lie in [0, model.max_seq_len={m.max_seq_len}): "
        "the prompt and the sample share the model's context.",
    )
    need(
        not r.wandb_project or importlib.util.find_spec("wandb") is not None,
        f"run.wandb_project={r.wandb_project!r} needs the wandb package: pip install "
        "'lmjax[wandb]', or unset run.wandb_project.",
    )
    need(
        r.watchdog_factor == 0 or r.watchdog_factor >= 1,
        f"run.watchdog_factor={r.watchdog_factor} must be 0 (off) or at least 1 (a multiple "
        "of the measured step time).",
    )
    need(
        r.watchdog_min_seconds > 0 and r.watchdog_startup_seconds > 0,
        f"run.watchdog_min_seconds={r.watchdog_min_seconds} and run.watchdog_startup_seconds="
        f"{r.watchdog_startup_seconds} must be positive.",
    )
    if r.profile_steps:
        try:
            profile_window(r.profile_steps)
        except ConfigError as e:
            need(False, str(e))


def validate_tokenizer(config: Config, vocab_size: int, prompt_tokens: int) -> None:
    """Checks what depends on the loaded tokenizer: its vocabulary fits the embedding table,
    and the sample prompt (`prompt_tokens` ids) plus run.sample_tokens fit the context."""
    m, r = config.model, config.run
    problems = []
    if vocab_size > m.vocab_size:
        problems.append(
            f"the tokenizer {config.data.tokenizer or ''} has {vocab_size} ids but "
            f"model.vocab_size={m.vocab_size}: ids past the embedding table would "
            "train into NaNs. Raise model.vocab_size to at least "
            f"{vocab_size} or use a smaller tokenizer."
        )
    if r.sample_tokens and not prompt_tokens:
        problems.append(
            "run.sample_prompt is empty and the tokenizer has no BOS id: give a "
            "prompt or set run.sample_tokens=0."
        )
    if r.sample_tokens and prompt_tokens + r.sample_tokens > m.max_seq_len:
        problems.append(
            f"run.sample_prompt ({prompt_tokens} tokens) + run.sample_tokens="
            f"{r.sample_tokens} exceed model.max_seq_len={m.max_seq_len}: shorten "
            "either."
        )
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def profile_window(text: str) -> tuple[int, int]:
    """ "A:B" -> (A, B): trace steps A..B-1 (1-based step numbers, B excluded)."""
    start, sep, end = text.partition(":")
    try:
        window = int(start), int(end)
    except ValueError:
        window = None
    if not sep or window is None or not 1 <= window[0] < window[1]:
        raise ConfigError(
            f"run.profile_steps={text!r}: expected START:END with 1 <= START < END, "
            "e.g. 20:25 traces steps 20 to 24."
        )
    return window


# ---------------------------------------------------------------- (de)serialization


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict) -> Config:
    """Inverse of `to_dict`; unknown keys are an error (a config from another version)."""
    sections = {}
    for f in dataclasses.fields(Config):
        cls: Any = type(f.default)
        values = dict(data.get(f.name, {}))
        types_ = _field_types(cls)
        unknown = set(values) - set(types_)
        if unknown:
            raise ConfigError(f"config section {f.name!r} has unknown keys {sorted(unknown)}")
        for k, v in values.items():
            if typing.get_origin(types_[k]) is tuple:
                values[k] = tuple(v)
        sections[f.name] = cls(**values)
    return Config(**sections)


def to_json(config: Config) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def diff(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """`{"section.field": (old, new)}` for every field that differs."""
    a, b = to_dict(old), to_dict(new)
    return {f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]}
