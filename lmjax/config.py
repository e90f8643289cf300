"""Typed run configuration: one frozen dataclass per subsystem, the choices each field
takes, and `config.json`'s reading and writing.

Each subsystem function takes only its own part (`ModelConfig`, `DataConfig`, ...);
`Config` merely groups them for the command line, experiments and `config.json`. Parsing
`--set section.field=value` is `lmjax.config_overrides`; the checks of every field and of the
constraints between fields, run before anything is compiled, are `lmjax.config_checks`.
This module imports no other lmjax module, so an experiment file importing it loads nothing
else.
"""

from __future__ import annotations

import dataclasses
import json
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


def field_types(cls) -> dict[str, Any]:
    """{field name: declared type} of one of the dataclasses above (annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def moe_layer(m: ModelConfig, i: int) -> bool:
    """Whether layer i (0-based) has a mixture-of-experts MLP: after the first
    moe_first_dense_layers, every moe_every-th layer (all of them with moe_every 1)."""
    j = i - m.moe_first_dense_layers
    return m.moe_experts > 0 and j >= 0 and (j + 1) % max(m.moe_every, 1) == 0


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


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(data: dict) -> Config:
    """Inverse of `to_dict`; unknown keys are an error (a config from another version)."""
    sections = {}
    for f in dataclasses.fields(Config):
        cls: Any = type(f.default)
        values = dict(data.get(f.name, {}))
        types_ = field_types(cls)
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
