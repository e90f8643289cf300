"""The checks of a config before anything is compiled: every field's type and range, the
constraints between fields (`validate`), and what depends on the loaded tokenizer
(`validate_tokenizer`). Each problem is one line naming the field and the fix."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing

from lmjax.config import (
    ATTENTION_IMPLS,
    DTYPES,
    MATMUL_IMPLS,
    MLP_ACTIVATIONS,
    MOE_MATMUL_IMPLS,
    MOE_ROUTERS,
    REMAT_POLICIES,
    RESUME_ACCEPTABLE,
    ROPE_SCALING_TYPES,
    SCHEDULES,
    Config,
    ConfigError,
    ModelConfig,
    field_types,
    moe_layer,
    profile_window,
)


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
        for name, typ in field_types(type(part)).items():
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
