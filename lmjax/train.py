"""Train state, the jitted train step, and the training loop."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lmjax import compile_cache, evaluate, goodput, hooks as hooks_lib, loop, metrics as metrics_lib
from lmjax import model, optim, sharding
from lmjax.batch import BATCH_KEYS, Batch
from lmjax.config import Config, ModelConfig, OptimConfig, profile_window
from lmjax.objective import loss_terms

log = logging.getLogger("lmjax")



class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]; folded with the step wherever randomness is needed


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state; jit it with out_shardings to create it already sharded."""
    rng = jax.random.PRNGKey(seed)
    params = model.init(model_cfg, jax.random.fold_in(rng, 0))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng)


def state_axes(model_cfg: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
    """Logical axes of every state leaf: optimizer moments follow their parameter, the
    other optimizer leaves (counts) are replicated."""
    params_axes = model.param_axes(model_cfg)
    shapes = jax.eval_shape(functools.partial(init_state, model_cfg, tx, 0))
    params_def = jax.tree.structure(shapes.params)
    is_params = lambda x: jax.tree.structure(x) == params_def  # noqa: E731
    opt_axes = jax.tree.map(lambda x: params_axes if is_params(x) else (None,) * x.ndim,
                            shapes.opt_state, is_leaf=is_params)
    return TrainState(step=(), params=params_axes, opt_state=opt_axes, rng=(None,))


# ---------------------------------------------------------------- the step


def microbatches(x: jax.Array, n: int) -> jax.Array:
    """[batch, ...] -> [n, batch / n, ...], microbatch m = rows m, m + n, m + 2n, ...

    Strided, so that each microbatch takes rows from every batch shard: a device's
    contiguous block of rows holds its share of all n microbatches (when n divides the rows
    per shard) and no microbatch moves between devices.
    """
    micro = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(micro, (None, "act_batch") + (None,) * (x.ndim - 1))


def train_step(state: TrainState, batch: Batch, *, model_cfg: ModelConfig, optim_cfg: OptimConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule, skip_nonfinite: bool):
    """One optimizer update over `optim_cfg.grad_accum` microbatches. Pure.

    batch: arrays [batch, seq]. Returns (new_state, metrics of this step).
    """
    grad_fn = jax.grad(loss_terms, has_aux=True)
    n_micro = optim_cfg.grad_accum
    if n_micro == 1:
        grads, aux = grad_fn(state.params, batch, model_cfg, optim_cfg.z_loss)
    else:
        micro = jax.tree.map(lambda x: microbatches(x, n_micro), batch)
        params_axes = model.param_axes(model_cfg)
        like_params = lambda tree: jax.tree.map(sharding.constrain, tree, params_axes,  # noqa: E731
                                                is_leaf=sharding.is_axes)

        def accumulate(carry, mb):
            g, a = grad_fn(state.params, mb, model_cfg, optim_cfg.z_loss)
            g, a = jax.tree.map(jnp.add, carry, (g, a))
            return (like_params(g), a), None

        zeros = like_params(jax.tree.map(jnp.zeros_like, state.params))
        zero_aux = {"nll_sum": 0.0, "z_sum": 0.0, "tokens": 0.0}
        (grads, aux), _ = jax.lax.scan(accumulate, (zeros, jax.tree.map(jnp.float32, zero_aux)),
                                       micro)
    tokens = jnp.maximum(aux["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    loss = aux["nll_sum"] / tokens
    grad_norm = optax.tree.norm(grads)
    with jax.named_scope("optimizer"):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if skip_nonfinite:
        # A skipped step keeps the old params and moments, but the optimizer's integer leaves
        # (its step counts, which drive the schedule) advance with `step`, so the learning
        # rate applied after a skip is still schedule(step), the one logged.
        def keep_old(new, old):
            return jnp.where(finite, new, old) if jnp.issubdtype(new.dtype, jnp.inexact) else new

        new_state = new_state.replace(params=jax.tree.map(keep_old, params, state.params),
                                      opt_state=jax.tree.map(keep_old, opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "tokens": aux["tokens"], "finite": finite}
    if optim_cfg.z_loss:
        metrics["z_loss"] = aux["z_sum"] / tokens
    return new_state, metrics


# ---------------------------------------------------------------- compiled pieces


@dataclasses.dataclass
class Trainer:
    """Everything compiled for one (config, mesh): shardings, init and step functions."""

    config: Config
    mesh: Mesh
    rules: dict
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init_fn: Any
    step_fn: Any


def make_trainer(config: Config, mesh: Mesh) -> Trainer:
    """Builds shardings from the logical rules and jits init and step with them."""
    rules = sharding.rules_from_config(config.mesh)
    tx = optim.make_optimizer(config.optim, config.run.steps)
    schedule = optim.learning_rate_schedule(config.optim, config.run.steps)
    shapes = jax.eval_shape(functools.partial(init_state, config.model, tx, config.run.seed))
    axes = state_axes(config.model, tx)
    state_shardings = sharding.tree_shardings(axes, mesh, rules, shapes)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    init_fn = jax.jit(functools.partial(init_state, config.model, tx, config.run.seed),
                      out_shardings=state_shardings)
    step = functools.partial(train_step, model_cfg=config.model, optim_cfg=config.optim, tx=tx,
                             schedule=schedule,
                             skip_nonfinite=config.checkpoint.on_nonfinite == "skip")

    def step_with_rules(state, batch):
        with sharding.activation_sharding(mesh, rules):
            return step(state, batch)

    replicated = NamedSharding(mesh, P())
    step_fn = jax.jit(step_with_rules, in_shardings=(state_shardings, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
    return Trainer(config, mesh, rules, tx, schedule, state_shardings, batch_sharding, init_fn,
                   step_fn)


def global_batch(local: dict[str, np.ndarray], batch_sharding: NamedSharding) -> Batch:
    """Assembles this process's rows into global arrays laid out by `batch_sharding`.

    local: arrays [rows, seq] holding, in order, the global rows `sharding.process_rows`
    names for this process (the global batch size follows from their count). Each device
    gets exactly the rows of its batch shard, also when processes share rows.
    """
    n_local = len(local["inputs"])
    shards = sharding.batch_shard_count(batch_sharding)
    held = len(sharding.process_rows(batch_sharding, shards))  # batch shards on this process
    if (n_local * shards) % held:
        raise ValueError(f"{n_local} local rows cannot be {held} of {shards} equal batch shards")
    global_rows = n_local * shards // held
    rows = sharding.process_rows(batch_sharding, global_rows)

    def assemble(x: np.ndarray) -> jax.Array:
        def block(index):
            return x[np.searchsorted(rows, np.arange(global_rows)[index[0]])][:, *index[1:]]
        return jax.make_array_from_callback((global_rows, *x.shape[1:]), batch_sharding, block)

    return {k: assemble(np.asarray(local[k])) for k in BATCH_KEYS}


def evaluate_params(trainer: Trainer, params, sets: dict[str, list[dict]]) -> dict[str, float]:
    """The evaluator (`evaluate.eval_sums`) on process-local rows of each source, on the
    trainer's mesh: eval_loss, eval_perplexity and eval_tokens of all sources together and,
    with several sources, eval_loss/SOURCE of each."""
    place = functools.partial(global_batch, batch_sharding=trainer.batch_sharding)
    with sharding.activation_sharding(trainer.mesh, trainer.rules):
        sums = {name: evaluate.eval_sums(params, trainer.config.model, batches, place=place)
                for name, batches in sets.items()}
    total = evaluate.summarize(sum(n for n, _ in sums.values()), sum(t for _, t in sums.values()))
    result = {f"eval_{k}": v for k, v in total.items()}
    if len(sums) > 1:
        result.update({f"eval_loss/{name}": evaluate.summarize(*s)["loss"]
                       for name, s in sums.items()})
    return result


def _describe_devices(mesh: Mesh) -> str:
    d = jax.devices()[0]
    return (f"process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices "
            f"({d.device_kind}), mesh {dict(mesh.shape)}")


@dataclasses.dataclass
class _Run:
    """What `_set_up` prepared: the compiled trainer, the restored state and the data."""

    config: Config
    trainer: Trainer
    state: TrainState
    source: str  # where the state came from (checkpoint.describe_resume)
    pipeline: Any
    tokenizer: Any
    meta: dict  # what each checkpoint records about the run


def _set_up(config: Config, workdir: str, restore_from: str | None,
            init_from: str | None) -> _Run:
    """Validates, plans the resume (before anything expensive), builds the mesh, tokenizer,
    data pipeline and compiled trainer, and restores or initializes the state."""
    from lmjax import checkpoint
    from lmjax import data as data_lib
    from lmjax.config import to_json, validate, validate_tokenizer
    from lmjax.data import prepare

    config = validate(config)
    primary = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    resume = checkpoint.plan_resume(workdir, config, restore_from=restore_from,
                                    init_from=init_from)
    mesh = sharding.make_mesh(config.mesh)
    log.info(_describe_devices(mesh))
    rows = sharding.process_rows(
        sharding.batch_sharding(mesh, sharding.rules_from_config(config.mesh)),
        config.data.batch_size)
    tokenizer = data_lib.prepare_tokenizer(config.data, workdir, leader=primary)
    config = _with_tokenizer(config, tokenizer)
    fingerprint = tokenizer.fingerprint if tokenizer is not None else None
    resume.check_tokenizer(fingerprint)
    if tokenizer is not None:
        from lmjax import generate
        validate_tokenizer(config, tokenizer.vocab_size,
                           len(generate.prompt_ids(tokenizer, config.run.sample_prompt)))
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(to_json(config))
    stores = None if tokenizer is None else prepare.run_stores(
        config.data, tokenizer, prepare.store_root(config.data, workdir), leader=primary)
    pipeline = data_lib.make_pipeline(config.data, tokenizer, process_index=jax.process_index(),
                                      process_count=jax.process_count(), rows=rows, stores=stores,
                                      vocab_size=config.model.vocab_size)
    trainer = make_trainer(config, mesh)
    if primary:
        log.info("parameters:\n%s", sharding.describe_params(
            model.param_shapes(config.model), model.param_axes(config.model), mesh, trainer.rules))
    state, data_state, source = resume.load(trainer.init_fn, trainer.state_shardings, workdir,
                                            config.model)
    if data_state is not None:
        pipeline.check_state(data_state)
    return _Run(config, trainer, state, source, pipeline, tokenizer,
                checkpoint.make_metadata(config, fingerprint, mesh))


def _hooks(run: _Run, workdir: str, writer: metrics_lib.MetricsWriter, summary: dict,
           clock: goodput.Clock, signals) -> list[loop.Hook]:
    """The built-in hooks, in the order they see each event."""
    from lmjax import checkpoint
    config, trainer = run.config, run.trainer
    total, skip = config.run.steps, config.checkpoint.on_nonfinite == "skip"
    throughput = metrics_lib.Throughput(config.model, config.data.batch_size,
                                        config.data.seq_len, jax.devices())
    log.info("peak FLOP/s per device: %.3g (%s)", throughput.peak, throughput.peak_source)
    eval_sets = run.pipeline.eval_sets(config.run.eval_batches)
    ckpt = checkpoint.Checkpointer(checkpoint.checkpoint_dir(workdir), config.checkpoint,
                                   resumed_at=int(run.state.step))
    out = [hooks_lib.NonfiniteGuard(skip),
           hooks_lib.StepMetrics(writer, summary, throughput, config.run.log_every, total),
           hooks_lib.Checkpoints(ckpt, checkpoint.SaveSchedule(config.checkpoint, total, signals),
                                 run.pipeline.state, run.meta, skip, clock, summary)]
    if config.run.eval_batches:
        out.append(hooks_lib.Evaluation(lambda params: evaluate_params(trainer, params, eval_sets),
                                        writer, summary, config.run.eval_every, total))
    if config.run.sample_tokens and run.tokenizer is not None:
        out.append(hooks_lib.EndSample(lambda params: _sample(trainer, params, run.tokenizer),
                                       summary))
    if config.run.profile_steps and (config.run.profile_all_processes
                                     or jax.process_index() == 0):
        out.append(hooks_lib.Profile(*profile_window(config.run.profile_steps),
                                     os.path.join(workdir, "tensorboard")))
    return out


def train(config: Config, workdir: str, *, restore_from: str | None = None,
          init_from: str | None = None, hooks: tuple[loop.Hook, ...] = ()) -> dict[str, float]:
    """Trains `config` in `workdir` and returns the final metrics.

    Resumes from the newest readable checkpoint in `workdir/checkpoints` when there is one;
    otherwise `restore_from` (a checkpoint of another run, or a step of this one) or
    `init_from` (a params-only directory) or a fresh init (rules: `checkpoint.plan_resume`).
    Writes `config.json`, `metrics.jsonl` (appended), TensorBoard events and checkpoints.
    SIGTERM/SIGINT save at the next step boundary and return early with "stopped_at_step".
    `hooks`: more `loop.Hook`s, called after the built-in ones.
    """
    clock = goodput.Clock()
    with compile_cache.enabled(config.run.compile_cache_dir):
        return _train(config, workdir, restore_from, init_from, hooks, clock)


def _train(config: Config, workdir: str, restore_from: str | None, init_from: str | None,
           hooks: tuple[loop.Hook, ...], clock: goodput.Clock) -> dict[str, float]:
    from lmjax import checkpoint
    run = _set_up(config, workdir, restore_from, init_from)
    primary = jax.process_index() == 0
    redo_until = goodput.last_reached_step(workdir) if primary else 0
    writer = _writer(run.config, workdir, primary, int(run.state.step))
    step, summary = int(run.state.step), {}
    if run.source != "fresh init":
        writer.write(step, checkpoint.describe_resume(step, run.source))
    batches = (global_batch(b, run.trainer.batch_sharding)
               for b in run.pipeline.train_batches(step))
    signals = checkpoint.StopSignals()
    goodput_log = hooks_lib.GoodputLog(clock, writer, run.config.run.log_every, step)
    all_hooks = [*_hooks(run, workdir, writer, summary, clock, signals), *hooks, goodput_log]
    try:
        with signals:
            loop.run(run.trainer.step_fn, run.state, batches, run.config.run.steps, all_hooks,
                     clock, redo_until=redo_until)
    finally:
        batches.close()  # releases the tf.data iterator now, inside the accounted time
        writer.close(final=goodput_log.final)
    return summary


def _writer(config: Config, workdir: str, primary: bool,
            start_step: int) -> metrics_lib.MetricsWriter:
    """metrics.jsonl, TensorBoard and, with run.wandb_project, W&B (process 0 only)."""
    outputs = ()
    if primary and config.run.wandb_project:
        from lmjax import wandb_log
        outputs = (wandb_log.WandbWriter(config.run.wandb_project, workdir, config),)
    return metrics_lib.MetricsWriter(workdir, config.run.steps, enabled=primary,
                                     start_step=start_step, outputs=outputs)


def _sample(trainer: Trainer, params, tokenizer) -> str:
    """Greedy continuation of `run.sample_prompt`, computed on the training mesh."""
    from lmjax import generate
    run = trainer.config.run
    with sharding.activation_sharding(trainer.mesh, trainer.rules):
        text = generate.sample_text(params, trainer.config.model, tokenizer, run.sample_prompt,
                                    run.sample_tokens)
    log.info("sample: %r", text)
    return text


def _with_tokenizer(config: Config, tokenizer) -> Config:
    if tokenizer is None:
        return config
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer=tokenizer.path))
