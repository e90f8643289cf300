"""`lmjax checkpoint list|export`: what a run has saved, and params-only copies of it."""

from __future__ import annotations

import argparse

from lmjax.commands import watch


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoint", help="list or export a run's checkpoints")
    ck = p.add_subparsers(dest="checkpoint_command", required=True)
    q = ck.add_parser("list", help="steps, sizes, completeness and metadata")
    q.add_argument("workdir")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.set_defaults(func=list_from_args)
    q = ck.add_parser("export", help="write a params-only copy of a checkpoint")
    q.add_argument("workdir")
    q.add_argument("--step", type=int, default=None, help="default: the newest")
    q.add_argument(
        "--params-only",
        required=True,
        metavar="OUT",
        help="output dir: OUT/params (orbax) and OUT/model_config.json",
    )
    watch.add_flag(q)
    q.set_defaults(func=export_from_args)


def list_from_args(args: argparse.Namespace) -> int:
    return list_steps(args.workdir, args.json)


def export_from_args(args: argparse.Namespace) -> int:
    from lmjax.parallel import distributed

    distributed.initialize()  # started as several processes, they export together
    with watch.watching(args.watchdog_seconds, watch.rerun_into(args.params_only)) as expect:
        expect("the export (the checkpoint's restore and the params' write)")
        return export(args.workdir, args.step, args.params_only)


def list_steps(workdir: str, as_json: bool = False) -> int:
    """Prints every step with its size, completeness and metadata (a table or JSON)."""
    from lmjax.checkpoint import listing

    rows = listing.list_checkpoints(workdir)
    print(listing.json_summary(rows) if as_json else listing.format_listing(rows))
    return 0


def export(workdir: str, step: int | None, out: str) -> int:
    """Writes OUT/params and OUT/model_config.json from a step (default: the newest). Started
    as several processes (`distributed.initialize` first), each restores and writes its
    shards."""
    from lmjax.checkpoint import listing
    from lmjax.parallel import distributed

    summary = listing.export_params(workdir, step, out)
    if distributed.is_primary():
        print(summary)
    return 0
