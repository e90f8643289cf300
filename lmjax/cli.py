"""`lmjax` command line: parses arguments and calls one function per subcommand."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from lmjax import storage
from lmjax.config import Config, ConfigError, apply_overrides, validate
from lmjax.errors import FaultError

EXPERIMENT_DIRS = (
    Path.cwd() / "experiments",
    Path(__file__).resolve().parent / "experiments",
)


def experiment_names() -> list[str]:
    names: set[str] = set()
    for d in EXPERIMENT_DIRS:
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.py") if not p.stem.startswith("_"))
    return sorted(names)


def load_experiment(name_or_path: str, overrides: list[str] = ()) -> Config:
    """The Config returned by `config()` in experiments/NAME.py (or a path), with overrides."""
    path = Path(name_or_path)
    if path.suffix != ".py":
        path = next(
            (
                d / f"{name_or_path}.py"
                for d in EXPERIMENT_DIRS
                if (d / f"{name_or_path}.py").is_file()
            ),
            None,
        )
        if path is None:
            raise ConfigError(
                f"unknown experiment {name_or_path!r}; known: "
                f"{', '.join(experiment_names())} (or give a path to a .py file)"
            )
    if not path.is_file():
        raise ConfigError(f"experiment file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"lmjax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "config"):
        raise ConfigError(f"experiment {str(path)!r} must define config() -> lmjax.config.Config")
    return validate(apply_overrides(module.config(), list(overrides)))


def _add_experiment_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--experiment",
        default=default,
        required=default is None,
        help="experiment name in experiments/ or a path to a .py file",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set run.steps=100 (repeatable)",
    )


def _add_target_args(p: argparse.ArgumentParser, more_help: str) -> None:
    _add_experiment_args(p)
    p.add_argument(
        "--topology",
        required=True,
        help="Cloud TPU name (v5p-128, v4-64, v5litepod-16, v6e-256) or a topology "
        "(v5p:4x4x4)" + more_help,
    )
    p.add_argument("--num-slices", type=int, default=1, help="multi-slice: number of slices")


# Each command module is imported when its command runs, so that `lmjax --help` and every
# command load only what that command needs (TensorFlow, orbax, Beam and libtpu are slow).


def _cmd_train(args) -> int:
    from lmjax.commands import train

    config = load_experiment(args.experiment, args.overrides)
    return train.main(config, args.workdir, args.restore_from, args.init_from)


def _cmd_checkpoint_list(args) -> int:
    from lmjax.commands import checkpoint

    return checkpoint.list_steps(args.workdir, args.json)


def _cmd_checkpoint_export(args) -> int:
    from lmjax.commands import checkpoint

    return checkpoint.export(args.workdir, args.step, args.params_only)


def _cmd_smoke(args) -> int:
    from lmjax.commands import smoke

    config = load_experiment(args.experiment, args.overrides)
    return smoke.main(config, args.steps, args.workdir, args.expect_platform)


def _cmd_doctor(args) -> int:
    from lmjax.commands import doctor

    config = load_experiment(args.experiment, args.overrides)
    return doctor.main(config, args.workdir, args.expect_platform)


def _cmd_convert(args) -> int:
    from lmjax.commands import convert

    if args.direction == "from-hf":
        return convert.from_hf(args.src, args.out)
    return convert.to_hf(args.src, args.out, dtype=args.dtype)


def _cmd_bench(args) -> int:
    from lmjax.commands import bench

    config = load_experiment(args.experiment, args.overrides)
    if args.what == "step":
        bench.step(config, sweeps=args.sweep, steps=args.steps, profile_dir=args.profile)
    elif args.what == "data":
        bench.data(config, _data_workdir(args, config), args.seconds, args.start_step)
    else:
        bench.generation(config.model, args.batch, args.prompt_len, args.new_tokens)
    return 0


def _cmd_report(args) -> int:
    from lmjax.commands import report

    return report.main(args.workdir, args.png)


def _cmd_eval(args) -> int:
    from lmjax.commands import evaluate as eval_command

    eval_command.main(
        args.workdir,
        args.step,
        args.text_files or (),
        args.experiment_data,
        args.json,
        context_len=args.context_len,
        stride=args.stride,
    )
    return 0


def _cmd_generate(args) -> int:
    from lmjax.commands import generate

    generate.main(
        args.workdir,
        args.step,
        list(args.prompt),
        args.max_new_tokens,
        prompts_file=args.prompts_file,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    return 0


def _data_workdir(args, config: Config) -> str:
    return args.workdir or os.path.join(os.path.expanduser("~/.cache/lmjax"), config.run.name)


def _cmd_data_preview(args) -> int:
    from lmjax.commands import data

    config = load_experiment(args.experiment, args.overrides)
    data.preview(
        config,
        _data_workdir(args, config),
        args.start_step,
        args.batches,
        args.process_index,
        args.process_count,
    )
    return 0


def _cmd_data_verify(args) -> int:
    from lmjax.commands import data

    return data.verify(args.store, args.workers)


def _cmd_data_prepare(args) -> int:
    from lmjax.commands import data

    config = load_experiment(args.experiment, args.overrides)
    data.prepare(
        config, _data_workdir(args, config), args.beam_runner, args.workers, args.beam_options
    )
    return 0


def _cmd_tokenizer_train(args) -> int:
    from lmjax.commands import tokenizer

    return tokenizer.train(
        args.input,
        args.vocab_size,
        args.model_type,
        args.output,
        text_key=args.text_key,
        kind=args.kind,
        seed=args.seed,
    )


def _cmd_soak(args) -> int:
    from lmjax.commands import soak

    return soak.main(
        args.workdir, args.trials, args.experiment, args.overrides, args.steps, args.seed
    )


def _cmd_compile(args) -> int:
    # The compile targets TPU devices described by libtpu; this machine's accelerators are not
    # needed, so unless told otherwise jax stays on the CPU instead of probing for a TPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from lmjax.commands import aot as compile_command

    config = load_experiment(args.experiment, args.overrides)
    return compile_command.main(config, args.topology, args.num_slices)


def _cmd_plan(args) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # as for compile: the TPU is described, not used
    from lmjax.commands import plan as plan_command
    from lmjax.tools.plan import Request

    config = load_experiment(args.experiment, args.overrides)
    presets = None
    if args.budget_chip_hours:
        presets = {name: load_experiment(name).model for name in experiment_names()}
    request = Request(
        args.topology,
        args.num_slices,
        tuple(args.sweep),
        args.workers,
        args.timeout,
        args.xla_estimate,
        args.tokens,
        args.days,
        args.budget_chip_hours,
        args.measure,
    )
    return plan_command.main(config, request, presets, args.json)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) an experiment in a workdir")
    _add_experiment_args(p)
    p.add_argument("--workdir", required=True, help="run directory (local or gs://)")
    p.add_argument(
        "--restore-from",
        metavar="DIR_OR_STEP",
        help="continue from a step of this workdir, or (in a workdir without "
        "checkpoints) from another run's checkpoints dir or checkpoints/STEP",
    )
    p.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from these params only (a dir written by `lmjax checkpoint "
        "export` or `lmjax convert from-hf`), with a fresh optimizer",
    )
    p.set_defaults(func=_cmd_train)


def _add_expect_platform(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--expect-platform",
        choices=["", "cpu", "gpu", "tpu"],
        default="",
        help="fail unless jax runs on this platform (catches a silent CPU fallback)",
    )


def _add_smoke(sub) -> None:
    p = sub.add_parser("smoke", help="check this machine end to end: train, resume, generate")
    _add_experiment_args(p, default="smoke")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workdir", default="", help="where to keep the runs (default: a temp dir)")
    _add_expect_platform(p)
    p.set_defaults(func=_cmd_smoke)


def _add_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="the preflight checks of `lmjax train`, nothing compiled: versions, devices, "
        "mesh, attention kernel, writable dirs, and that every process of the job agrees",
    )
    _add_experiment_args(p, default="smoke")
    p.add_argument(
        "--workdir", default="", help="the run directory to check (local or gs://; default: none)"
    )
    _add_expect_platform(p)
    p.set_defaults(func=_cmd_doctor)


def _add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="list or export a run's checkpoints")
    ck = p.add_subparsers(dest="checkpoint_command", required=True)
    q = ck.add_parser("list", help="steps, sizes, completeness and metadata")
    q.add_argument("workdir")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=_cmd_checkpoint_list)
    q = ck.add_parser("export", help="write a params-only copy of a checkpoint")
    q.add_argument("workdir")
    q.add_argument("--step", type=int, default=None, help="default: the newest")
    q.add_argument(
        "--params-only",
        required=True,
        metavar="OUT",
        help="output dir: OUT/params (orbax) and OUT/model_config.json",
    )
    q.set_defaults(func=_cmd_checkpoint_export)


def _add_convert(sub) -> None:
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
    p.set_defaults(func=_cmd_convert)


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="print a benchmark table: the train step (default), the "
        "data pipeline alone, or generation",
    )
    p.add_argument("what", nargs="?", choices=["step", "data", "generate"], default="step")
    _add_experiment_args(p, default="bench_512")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="step: run once per value and compare in one table (repeatable: a grid)",
    )
    p.add_argument("--steps", type=int, default=5, help="step: timed steps per configuration")
    p.add_argument(
        "--profile",
        default="",
        metavar="DIR",
        help="step: write a jax.profiler trace of the timed steps to "
        "DIR/plugins/profile/ (open DIR in TensorBoard)",
    )
    p.add_argument(
        "--workdir",
        default="",
        help="data: run directory whose tokenizer and store "
        "to use (default ~/.cache/lmjax/RUN_NAME)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="data: how long to read")
    p.add_argument("--start-step", type=int, default=0, help="data: the first step read")
    p.add_argument("--batch", type=int, default=8, help="generate: prompts per batch")
    p.add_argument("--prompt-len", type=int, default=128, help="generate: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="generate: tokens to decode")
    p.set_defaults(func=_cmd_bench)


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="where a run's time went (goodput, across restarts) and "
        "a PNG of loss, throughput and the time buckets",
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--png", default="", help="where to write the plot (default WORKDIR/report.png)")
    p.set_defaults(func=_cmd_report)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits-per-byte of a checkpoint")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--text-files", nargs="+", metavar="GLOB", help="UTF-8 files, one document each"
    )
    src.add_argument(
        "--experiment-data", action="store_true", help="the run's own evaluation batches"
    )
    p.add_argument("--context-len", type=int, default=None, help="default: the run's data.seq_len")
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="sliding-window stride for long documents (default: context_len / 2)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue prompts with a checkpoint (KV cache)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="default: the newest checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", default="", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)


def _add_compile(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="compile the train step for a TPU topology (libtpu) and "
        "report memory per chip; exit 1 if it does not fit",
    )
    _add_target_args(p, "")
    p.set_defaults(func=_cmd_compile)


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="compile candidate meshes, batches and remat policies for a "
        "TPU slice; rank those that fit by estimated speed",
    )
    _add_target_args(
        p, "; cpu: this machine's jax devices, with its measured peak and memory bandwidth"
    )
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="replace a dimension of the candidate space (repeatable): mesh.data, "
        "mesh.tensor, mesh.dcn_data, rows_per_chip, model.remat, "
        "optim.grad_accum; or add any config field, e.g. model.attention",
    )
    p.add_argument("--workers", type=int, default=2, help="compiles at once (processes)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per candidate")
    p.add_argument(
        "--xla-estimate",
        action="store_true",
        help="also the TPU compiler's optimal_seconds per step (two more small "
        "compiles per candidate)",
    )
    p.add_argument(
        "--tokens",
        type=float,
        default=0,
        help="turn the best candidate into a run of this many tokens",
    )
    p.add_argument("--days", type=float, default=0, help="... or of this many days")
    p.add_argument(
        "--budget-chip-hours",
        type=float,
        default=0,
        help="propose a compute-optimal model size and token count for this budget",
    )
    p.add_argument(
        "--measure",
        type=int,
        default=0,
        metavar="N",
        help="with --topology cpu: also time the best N candidates here",
    )
    p.add_argument("--json", action="store_true", help="print JSON (schema lmjax.tools.plan/1)")
    p.set_defaults(func=_cmd_plan)


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare a run's data store; look at its batches")
    dt = p.add_subparsers(dest="data_command", required=True)
    q = dt.add_parser(
        "preview", help="per batch: step, content hash, packing efficiency, a document start"
    )
    _add_experiment_args(q)
    q.add_argument(
        "--workdir",
        default="",
        help="run directory whose tokenizer and store to use (default ~/.cache/lmjax/RUN_NAME)",
    )
    q.add_argument("--start-step", type=int, default=0)
    q.add_argument("--batches", type=int, default=4)
    q.add_argument(
        "--process-index",
        type=int,
        default=0,
        help="show the rows this process of --process-count would read",
    )
    q.add_argument("--process-count", type=int, default=1)
    q.set_defaults(func=_cmd_data_preview)
    q = dt.add_parser(
        "prepare",
        help="tokenize the run's documents once into a store (no-op "
        "when it exists; reruns finish an interrupted one)",
    )
    _add_experiment_args(q)
    q.add_argument(
        "--workdir",
        default="",
        help="run directory: its tokenizer.model, and the "
        "store under WORKDIR/data unless data.store_dir "
        "is set (default ~/.cache/lmjax/RUN_NAME)",
    )
    q.add_argument(
        "--beam-runner",
        default="DirectRunner",
        metavar="RUNNER",
        help="Apache Beam runner: DirectRunner (this machine), DataflowRunner, "
        "SparkRunner, FlinkRunner or PortableRunner",
    )
    q.add_argument(
        "--workers", type=int, default=1, help="DirectRunner worker processes (1: in this process)"
    )
    q.add_argument(
        "--beam-options",
        default="",
        metavar="'--NAME=VALUE ...'",
        help="more Beam pipeline options, one quoted string, e.g. '--project=p "
        "--region=us-central1 --temp_location=gs://b/tmp' for Dataflow",
    )
    q.set_defaults(func=_cmd_data_prepare)

    q = dt.add_parser(
        "verify", help="read every record of a store (checksums) in parallel; name bad shards"
    )
    q.add_argument("store", help="the store directory (holding store.json), local or gs://")
    q.add_argument("--workers", type=int, default=16, help="objects read at once")
    q.set_defaults(func=_cmd_data_verify)


def _add_soak(sub) -> None:
    p = sub.add_parser(
        "soak",
        help="kill soak: SIGKILL training at random moments (in a save, "
        "in the first save, between saves), resume, compare losses "
        "bit for bit with an uninterrupted run; prints N/N",
    )
    _add_experiment_args(p, default="smoke")
    p.add_argument("--workdir", required=True, help="where the reference and trial runs go")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--steps", type=int, default=12, help="steps per run (checkpoints every 4)")
    p.add_argument("--seed", type=int, default=0, help="seeds the random kill moments")
    p.set_defaults(func=_cmd_soak)


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a SentencePiece or tokenizer.json tokenizer")
    tk = p.add_subparsers(dest="tokenizer_command", required=True)
    q = tk.add_parser(
        "train",
        help="train on text files (.txt, .jsonl, .parquet, gzip or zstd); pad/bos/eos = 0-2",
    )
    q.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="GLOB",
        help="files, globs or directories (local or gs://)",
    )
    q.add_argument("--vocab-size", type=int, required=True)
    q.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    q.add_argument(
        "--kind",
        choices=["sentencepiece", "tokenizers"],
        default="sentencepiece",
        help="sentencepiece: PREFIX.model (byte fallback); tokenizers: a Hugging Face "
        "PREFIX.json (byte-level BPE, Llama 3's split)",
    )
    q.add_argument(
        "--output",
        required=True,
        metavar="PREFIX",
        help="writes PREFIX.model and PREFIX.vocab, or PREFIX.json",
    )
    q.add_argument(
        "--text-key", default="text", help="JSON key (.jsonl) or column (.parquet) of the text"
    )
    q.add_argument("--seed", type=int, default=0, help="seeds SentencePiece's sentence sample")
    q.set_defaults(func=_cmd_tokenizer_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmjax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_train,
        _add_smoke,
        _add_doctor,
        _add_checkpoint,
        _add_convert,
        _add_bench,
        _add_report,
        _add_eval,
        _add_generate,
        _add_compile,
        _add_plan,
        _add_data,
        _add_soak,
        _add_tokenizer,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    storage.follow_emulator()  # before any command creates a Cloud Storage client
    if not args.verbose:  # orbax and tfds log every file operation at INFO
        logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except ConfigError as e:  # the user's mistake; anything else is a bug
        if args.verbose:
            raise
        print(f"lmjax: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, FaultError) as e:
        if args.verbose:
            raise
        print(f"lmjax: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
