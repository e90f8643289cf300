"""A run's goodput totals across all its restarts, and a PNG of loss, eval loss, throughput
and the goodput buckets over time, both from the run's records (`lmjax report` prints them)."""

from __future__ import annotations

from lmjax import storage
from lmjax.config import ConfigError
from lmjax.observe import goodput, metrics

LABELS = {
    "startup": "start-up & compile",
    "data": "data waiting",
    "train": "training steps",
    "lost": "redone after restart",
    "checkpoint": "checkpoint blocking",
    "eval": "evaluation & sample",
    "profile": "profiling",
    "between_starts": "between starts",
}


def load(workdir: str) -> list[dict]:
    """The run's metrics records (`metrics.read_records`); none at all is a user error."""
    try:
        return metrics.read_records(workdir)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}: give the --workdir of a training run.") from None


def format_totals(records: list[dict]) -> str:
    """The table `lmjax report` prints: seconds and share of each bucket, then goodput."""
    total = goodput.summarize(records)
    if not total["starts"]:
        return "no goodput records (the run predates them or wrote none yet)"
    steps = max((r["step"] for r in records if "loss" in r), default=0)
    lines = [f"{int(total['starts'])} start(s), step {steps}, wall time {total['total']:.1f} s"]
    for key, label in LABELS.items():
        share = total[key] / total["total"] if total["total"] else 0.0
        lines.append(f"  {label:<22} {total[key]:>10.1f} s {share:>7.1%}")
    lines.append(f"goodput (training steps / wall time): {total['goodput']:.1%}")
    return "\n".join(lines)


def _goodput_over_time(records: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
    """(seconds since the first start, {bucket: cumulative seconds over all starts so far})."""
    keys = [*goodput.BUCKETS, "between_starts"]
    done = dict.fromkeys(keys, 0.0)  # totals of the starts before the current one
    current: dict[str, float] = {}
    start, first_start, last_time = None, None, None
    times: list[float] = []
    series: dict[str, list[float]] = {k: [] for k in keys}
    for r in records:
        if r.get("event") != goodput.EVENT:
            continue
        if r["run_start"] != start:
            for k, v in current.items():
                done[k] += v
            if last_time is not None:
                done["between_starts"] += max(0.0, r["run_start"] - last_time)
            start, first_start = r["run_start"], first_start or r["run_start"]
        current = {b: r[f"{goodput.PREFIX}{b}_s"] for b in goodput.BUCKETS}
        last_time = r["time"]
        times.append(r["time"] - first_start)
        for k in keys:
            series[k].append(done[k] + current.get(k, 0.0))
    return times, series


def plot(records: list[dict], path: str) -> str:
    """Writes a PNG with four panels (loss and eval loss, tokens/s, MFU, goodput buckets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    for ax, key, title in (
        (axes[0][1], "tokens_per_second", "throughput (tokens/s)"),
        (axes[1][0], "mfu", "model FLOP utilization"),
    ):
        ax.plot([r["step"] for r in steps if key in r], [r[key] for r in steps if key in r], ".")
        ax.set(xlabel="step", title=title)
    times, series = _goodput_over_time(records)
    unit, scale = ("hours", 3600) if times and times[-1] > 7200 else ("minutes", 60)
    ax = axes[1][1]
    if times:
        ax.stackplot(
            [t / scale for t in times],
            *([v / scale for v in values] for values in series.values()),
            labels=[LABELS[k] for k in series],
        )
        ax.legend(loc="upper left", fontsize="small")
    ax.set(
        xlabel=f"{unit} since the first start", ylabel=f"{unit} spent", title="where the time went"
    )
    fig.tight_layout()
    with storage.path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path
