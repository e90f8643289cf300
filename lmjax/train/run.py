"""A training run: `train(config, workdir)` decides the resume, builds the mesh, tokenizer, data
and compiled step (`lmjax.train.trainer`), restores or initializes the state, and drives `lmjax.train.loop`
with the built-in hooks (`lmjax.train.hooks`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import jax
from jax.sharding import Mesh

from lmjax import storage
from lmjax.checkpoint import checkpointer, compat, lease, paths, resume as resume_lib, schedule
from lmjax.config import Config, profile_window, to_json
from lmjax.config_checks import validate, validate_tokenizer
from lmjax.data import prepare, run_stores
from lmjax.inference import generate
from lmjax.model import transformer
from lmjax.observe import goodput, metrics as metrics_lib, throughput, wandb_log
from lmjax.parallel import sharding
from lmjax.parallel.host_rows import global_batch
from lmjax.train import compile_cache, hooks as hooks_lib, loop, watchdog
from lmjax.train.trainer import Trainer, TrainState, evaluate_params, make_trainer
from lmjax.workdir_names import CONFIG, TENSORBOARD

log = logging.getLogger("lmjax")


def _describe_devices(mesh: Mesh) -> str:
    d = jax.devices()[0]
    return (
        f"process {jax.process_index()}/{jax.process_count()}, {jax.device_count()} devices "
        f"({d.device_kind}), mesh {dict(mesh.shape)}"
    )


@dataclasses.dataclass
class _Setup:
    """What `_set_up` prepared: the compiled trainer, the restored state and the data."""

    config: Config
    trainer: Trainer
    state: TrainState
    source: str  # where the state came from (resume_lib.describe_resume)
    pipeline: Any
    tokenizer: Any
    meta: dict  # what each checkpoint records about the run


def _describe_params(config: Config, mesh, trainer) -> str:
    """Every parameter's shape, logical axes, partition spec and bytes per device."""
    return sharding.describe_params(
        transformer.param_shapes(config.model),
        transformer.param_axes(config.model),
        mesh,
        trainer.rules,
    )


def _set_up(
    config: Config,
    workdir: str,
    restore_from: str | None,
    init_from: str | None,
    watch: watchdog.Watchdog,
) -> _Setup:
    """Refuses what the config, the devices and the mesh rule out (every parameter's sharding,
    through `jax.eval_shape`) and decides the resume (reading only metadata) before anything
    expensive; then builds the tokenizer, data pipeline and state (restored or initialized).
    config.json is written once the state is restored. Each phase is named to `watch`."""
    primary = jax.process_index() == 0
    watch.expect("the mesh and the step's shardings")
    mesh = sharding.make_mesh(config.mesh)
    log.info(_describe_devices(mesh))
    trainer = make_trainer(config, mesh)
    rows = sharding.process_rows(trainer.batch_sharding, config.data.batch_size)
    sharding.check_microbatch(
        trainer.batch_sharding, config.data.batch_size, config.optim.grad_accum
    )
    watch.expect("the resume decision (the checkpoints' metadata)")
    resume = resume_lib.decide_resume(
        workdir, config, restore_from=restore_from, init_from=init_from
    )
    watch.expect(
        "the tokenizer and the data stores (found, or prepared by process 0)",
        max(watch.startup_seconds, config.data.prepare_timeout_s),
    )
    config, tokenizer = _tokenizer(config, workdir, primary, resume)
    trainer = dataclasses.replace(trainer, config=config)
    fingerprint = tokenizer.fingerprint if tokenizer is not None else None
    pipeline = run_stores.run_pipeline(
        config,
        tokenizer,
        workdir,
        leader=primary,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        rows=rows,
        progress=watch.progress,  # each shard prepared inline restarts the phase's deadline
    )
    if primary:
        log.info("parameters:\n%s", _describe_params(config, mesh, trainer))
    watch.expect("the train state (restored or initialized)")
    state, data_state, source = resume.load(
        trainer.init_fn, trainer.state_shardings, workdir, config.model
    )
    if data_state is not None:
        pipeline.check_state(data_state, config.checkpoint.accept_changes)
    if primary:
        storage.path(storage.join(workdir, CONFIG)).write_text(to_json(config))
    return _Setup(
        config,
        trainer,
        state,
        source,
        pipeline,
        tokenizer,
        compat.make_metadata(config, fingerprint, mesh),
    )


def _hooks(
    setup: _Setup,
    workdir: str,
    writer: metrics_lib.MetricsWriter,
    summary: dict,
    clock: goodput.Clock,
    signals,
    lease_guard: lease.Guard,
    loss_guard: hooks_lib.LossGuard,
    watch: watchdog.Watchdog,
) -> list[loop.Hook]:
    """The built-in hooks, in the order they see each event."""
    config, r = setup.config, setup.config.run
    rates = throughput.Throughput(
        config.model, config.data.batch_size, config.data.seq_len, jax.devices()
    )
    log.info("peak FLOP/s per device: %.3g (%s)", rates.peak, rates.peak_source)
    eval_sets = setup.pipeline.eval_sets(r.eval_batches)
    ckpt = checkpointer.Checkpointer(
        paths.checkpoint_dir(workdir),
        config.checkpoint,
        resumed_at=int(setup.state.step),
        guard=lease_guard,
        lease_lost=lease_guard.lost,
        before_commit=lease_guard.confirm_commit,
    )
    return [
        watch,
        loss_guard,
        hooks_lib.StepMetrics(writer, summary, rates, r.log_every, r.steps),
        hooks_lib.Checkpoints(
            ckpt,
            schedule.SaveSchedule(config.checkpoint, r.steps, signals),
            setup.pipeline.state,
            setup.meta,
            config.checkpoint.on_nonfinite == "skip",
            clock,
            summary,
            watch.busy,
            loss_guard.check,
        ),
        *_optional_hooks(setup, workdir, writer, summary, eval_sets, watch.busy),
    ]


def _optional_hooks(
    setup: _Setup,
    workdir: str,
    writer: metrics_lib.MetricsWriter,
    summary: dict,
    eval_sets,
    busy,
) -> list[loop.Hook]:
    """The hooks the run config turns on, in this order: evaluation (run.eval_batches), the
    end-of-run sample (run.sample_tokens, with a tokenizer) and the profile (run.profile_steps)."""
    trainer, r = setup.trainer, setup.config.run
    out: list[loop.Hook] = []
    if r.eval_batches:
        out.append(
            hooks_lib.Evaluation(
                lambda params: evaluate_params(
                    trainer, params, eval_sets, setup.pipeline.eval_weights
                ),
                writer,
                summary,
                r.eval_every,
                r.steps,
                busy,
            )
        )
    if r.sample_tokens and setup.tokenizer is not None:
        out.append(
            hooks_lib.EndSample(lambda params: _sample(trainer, params, setup.tokenizer), summary)
        )
    if r.profile_steps and (r.profile_all_processes or jax.process_index() == 0):
        out.append(
            hooks_lib.Profile(*profile_window(r.profile_steps), os.path.join(workdir, TENSORBOARD))
        )
    return out


def train(
    config: Config,
    workdir: str,
    *,
    restore_from: str | None = None,
    init_from: str | None = None,
    hooks: tuple[loop.Hook, ...] = (),
) -> dict[str, float]:
    """Trains `config` in `workdir` and returns the final metrics.

    Resumes from the newest readable checkpoint in `workdir/checkpoints` when there is one;
    otherwise `restore_from` (a checkpoint of another run, or a step of this one) or
    `init_from` (a params-only directory) or a fresh init (rules: `resume_lib.decide_resume`).
    Holds the workdir's lease (`lease.held`: a second run on a live workdir is refused) from
    before any checkpoint is read until the end. The progress watchdog watches every phase
    from the lease to the last save's commit (`watchdog.watching`).
    Writes `config.json`, its records (WORKDIR/metrics/, one object per start), TensorBoard
    events and checkpoints.
    SIGTERM/SIGINT save at the next step boundary and return early with "stopped_at_step".
    A step the loss guard rejects (checkpoint.on_nonfinite=rewind, checkpoint.spike_factor)
    sends the run back to its newest checkpoint with that step's batch skipped (`_rewind`).
    `hooks`: more `loop.Hook`s, called after the built-in ones except GoodputLog, which runs
    last so that its record counts their time.
    """
    config = validate(config)
    clock = goodput.Clock()
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    with watchdog.watching(config.run) as watch:
        # a run may wait for another host's lease to expire (about one lease timeout)
        watch.expect(
            "the workdir's lease",
            max(watch.startup_seconds, 2 * config.checkpoint.lease_timeout_s),
        )
        with (
            lease.held(workdir, config.checkpoint.lease_timeout_s) as guard,
            compile_cache.enabled(config.run.compile_cache_dir),
        ):
            return _train(config, workdir, restore_from, init_from, hooks, clock, (guard, watch))


def _train(
    config: Config,
    workdir: str,
    restore_from: str | None,
    init_from: str | None,
    hooks: tuple[loop.Hook, ...],
    clock: goodput.Clock,
    guards: tuple[lease.Guard, watchdog.Watchdog],
) -> dict[str, float]:
    lease_guard, watch = guards
    setup = _set_up(config, workdir, restore_from, init_from, watch)
    watch.expect("the run's records, evaluation windows and checkpoints")
    primary = jax.process_index() == 0
    redo_until = goodput.last_reached_step(workdir) if primary else 0
    writer = _writer(setup.config, workdir, primary, int(setup.state.step))
    step, summary = int(setup.state.step), dict[str, Any]()
    if setup.source != "fresh init":
        writer.write(step, resume_lib.describe_resume(step, setup.source))
    c = setup.config.checkpoint
    loss_guard = hooks_lib.LossGuard(c.on_nonfinite, c.spike_factor, c.max_rewinds)
    goodput_log = hooks_lib.GoodputLog(clock, writer, setup.config.run.log_every, step)
    try:
        while True:
            try:
                _run_loop(
                    setup,
                    workdir,
                    writer,
                    summary,
                    clock,
                    (lease_guard, loss_guard, watch),
                    hooks,
                    goodput_log,
                    redo_until,
                )
                return summary
            except hooks_lib.Rewind as rewind:
                watch.expect("the rewind's restore")
                setup = _rewind(setup, workdir, restore_from, init_from, rewind, loss_guard, writer)
                redo_until = max(redo_until, rewind.step)
    finally:
        writer.close(final=goodput_log.final)


def _run_loop(
    setup: _Setup,
    workdir: str,
    writer: metrics_lib.MetricsWriter,
    summary: dict,
    clock: goodput.Clock,
    guards: tuple[lease.Guard, hooks_lib.LossGuard, watchdog.Watchdog],
    hooks: tuple[loop.Hook, ...],
    goodput_log: hooks_lib.GoodputLog,
    redo_until: int,
) -> None:
    """One pass of the training loop from `setup.state`, with fresh built-in hooks (a
    `hooks_lib.Rewind` from the loss guard ends it). guards: (the workdir lease's, the loss
    guard, the watchdog)."""
    batches = (
        global_batch(b, setup.trainer.batch_sharding)
        for b in setup.pipeline.train_batches(int(setup.state.step))
    )
    signals = schedule.StopSignals()
    built_in = _hooks(setup, workdir, writer, summary, clock, signals, *guards)
    try:
        with signals:
            loop.run(
                setup.trainer.step_fn,
                setup.state,
                batches,
                setup.config.run.steps,
                [*built_in, *hooks, goodput_log],
                clock,
                redo_until=redo_until,
            )
    finally:
        batches.close()  # stops the prefetch thread now, inside the accounted time


def _rewind(
    setup: _Setup,
    workdir: str,
    restore_from: str | None,
    init_from: str | None,
    rewind: hooks_lib.Rewind,
    guard: hooks_lib.LossGuard,
    writer: metrics_lib.MetricsWriter,
) -> _Setup:
    """`setup` back at the newest checkpoint (or where the run started), with the batch that
    the rejected step read skipped from now on; logged and written to the run's records."""
    pipeline, start = setup.pipeline, time.perf_counter()
    bad = pipeline.position(rewind.step - 1)
    decision = resume_lib.decide_resume(
        workdir, setup.config, restore_from=restore_from, init_from=init_from
    )
    state, _, source = decision.load(
        setup.trainer.init_fn, setup.trainer.state_shardings, workdir, setup.config.model
    )
    pipeline.skipped = tuple(sorted({*pipeline.skipped, bad}))
    guard.rewound(int(state.step))
    log.warning(
        "rewind %d/%d: %s; back to %s, skipping global batch %d",
        guard.rewinds,
        guard.max_rewinds,
        rewind.reason,
        source,
        bad,
    )
    writer.write(
        int(state.step),
        {
            "rewind": guard.rewinds,
            "rewind_from_step": rewind.step,
            "rejected_loss": rewind.loss,
            "skipped_batch": bad,
            "rewind_seconds": time.perf_counter() - start,  # the restore
        },
        progress=False,
    )
    return dataclasses.replace(setup, state=state, source=source)


def _writer(
    config: Config, workdir: str, primary: bool, start_step: int
) -> metrics_lib.MetricsWriter:
    """The run's records, TensorBoard and, with run.wandb_project, W&B (process 0 only)."""
    outputs: tuple[wandb_log.WandbWriter, ...] = ()
    if primary and config.run.wandb_project:
        outputs = (wandb_log.WandbWriter(config.run.wandb_project, workdir, config),)
    return metrics_lib.MetricsWriter(
        workdir, config.run.steps, enabled=primary, start_step=start_step, outputs=outputs
    )


def _sample(trainer: Trainer, params, tokenizer) -> str:
    """Greedy continuation of `run.sample_prompt`, computed on the training mesh."""
    run_cfg = trainer.config.run
    with sharding.activation_sharding(trainer.mesh, trainer.rules):
        text = generate.sample_text(
            params, trainer.config.model, tokenizer, run_cfg.sample_prompt, run_cfg.sample_tokens
        )
    log.info("sample: %r", text)
    return text


def _tokenizer(
    config: Config, workdir: str, primary: bool, resume: resume_lib.ResumeDecision
) -> tuple[Config, Any]:
    """(config naming the tokenizer's path, the tokenizer; None for synthetic tokens): loaded
    or trained once (by process 0), and checked against the checkpoint resumed from, the
    model's vocabulary and the sample prompt's length."""
    tokenizer = prepare.prepare_tokenizer(config.data, workdir, leader=primary)
    resume.check_tokenizer(tokenizer.fingerprint if tokenizer is not None else None)
    if tokenizer is None:
        return config, None
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, tokenizer=tokenizer.path)
    )
    prompt = tokenizer.encode_documents([config.run.sample_prompt], eos=False)[0]
    validate_tokenizer(config, tokenizer.vocab_size, len(prompt))
    return config, tokenizer
