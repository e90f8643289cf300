"""Prints the README's preparation table: `lmjax data prepare` of the same corpus in each input
format with each tokenizer, one preparation at a time, each in its own process (Beam in
process, `--workers 1`, so the child's peak RSS is the worker's).

    python scripts/make_bench_corpus.py --out /tmp/c300 --size-mb 300 --files 8 \\
        --formats txt,jsonl.gz,jsonl.zst,parquet
    python scripts/bench_prepare_formats.py --corpus /tmp/c300 --work /tmp/bench_formats

Both tokenizers (vocabulary 2048) are trained first on the first 30 MB of the corpus's first
`.txt` file, unless --sentencepiece/--tokenizer-json name existing ones. Each row gives MB/s and
tokens/s from prepare's summary, the child's peak RSS (wait4), and the load average before it
starts: the table is only as quiet as the machine.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time

FORMATS = ("txt", "jsonl.gz", "jsonl.zst", "parquet")
SUMMARY = re.compile(r"prepared in ([\d.]+) s: ([\d,]+) tokens/s, ([\d.]+) MB/s")
TOKENS = re.compile(r"-> ([\d,]+) train \+ ([\d,]+) validation tokens")


def lmjax(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmjax", *args]


def train_tokenizers(corpus: str, work: str) -> dict[str, str]:
    """Trains a sentencepiece model and a tokenizer.json on 30 MB of the corpus's first .txt
    file; returns {kind: path}."""
    source = sorted(glob.glob(os.path.join(corpus, "txt", "*.txt")))[0]
    sample = os.path.join(work, "sample.txt")
    with open(source, "rb") as f, open(sample, "wb") as out:
        out.write(f.read(30_000_000))
    made = {}
    for kind, suffix in (("sentencepiece", ".model"), ("tokenizers", ".json")):
        prefix = os.path.join(work, kind)
        command = ["tokenizer", "train", "--input", sample, "--vocab-size", "2048"]
        subprocess.run(lmjax(*command, "--kind", kind, "--output", prefix), check=True)
        made[kind] = prefix + suffix
    return made


def prepare(corpus_dir: str, tokenizer: str, workdir: str) -> dict:
    """One preparation in a child process: its summary figures and peak RSS in MB."""
    shutil.rmtree(workdir, ignore_errors=True)
    settings = [
        "data.source=text",
        f"data.text_files={corpus_dir}",
        f"data.tokenizer={tokenizer}",
    ]
    command = lmjax("data", "prepare", "--experiment", "quickstart", "--workdir", workdir)
    for s in settings:
        command += ["--set", s]
    load = os.getloadavg()[0]
    log = os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + ".log")
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # reaps it, with its own rusage
    text = open(log).read()
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"prepare failed, see {log}:\n{text[-3000:]}")
    found, tokens = SUMMARY.search(text), TOKENS.search(text)
    if not found or not tokens:
        raise SystemExit(f"no summary in prepare's output, see {log}")
    return {
        "seconds": float(found[1]),
        "tokens_per_second": float(found[2].replace(",", "")),
        "mb_per_second": float(found[3]),
        "tokens": f"{tokens[1]} + {tokens[2]}",
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", required=True, help="make_bench_corpus.py's --out")
    parser.add_argument("--work", required=True, help="scratch directory (emptied per row)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--sentencepiece", help="an existing .model (else trained here)")
    parser.add_argument("--tokenizer-json", help="an existing tokenizer.json (else trained)")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    if args.sentencepiece and args.tokenizer_json:
        kinds = {"sentencepiece": args.sentencepiece, "tokenizers": args.tokenizer_json}
    else:
        kinds = train_tokenizers(args.corpus, args.work)
    rows = []
    for form in args.formats.split(","):
        cells = []
        for kind, path in kinds.items():
            started = time.time()
            r = prepare(os.path.join(args.corpus, form), path, os.path.join(args.work, "run"))
            print(f"{form} {kind}: {r} ({time.time() - started:.0f} s)", flush=True)
            cells.append(
                f"{r['mb_per_second']:.2f} MB/s, {r['tokens_per_second'] / 1e3:,.0f}k tokens/s, "
                f"peak RSS {r['peak_rss_mb']:,.0f} MB (load {r['load']:.1f}); {r['tokens']}"
            )
        rows.append(f"| `{form}` | " + " | ".join(cells) + " |")
    print("| input | sentencepiece | tokenizer.json (byte-level BPE) |")
    print("|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
