#!/usr/bin/env python3
"""Many cores on the CPU path (issue 17, item 3): one process with OpenVINO streams, or several processes.

The same corpus through the real CLI (``tweet-embed embed``, end to end: read, tokenize, forward, write
Parquet), each way in its own fresh work dir, ways interleaved round by round (a shared machine slows them
alike). Ways:

- ``1 process, THROUGHPUT`` (the default): OpenVINO's THROUGHPUT hint, several streams with a request each;
- ``1 process, LATENCY``: one stream on every core (``TWEET_EMBED_OPENVINO_HINT=LATENCY``);
- ``K processes`` (``--devices cpu --workers-per-device K``): each process its own reading, tokenizing,
  writing and model, with cores / K threads, pinning off.

The figure is the run's own docs/s (the summary's, from the backend's start to the last marker), so process
start and model load are left out; the wall time of the whole command is printed beside it. Dedupe is off
(``--no-dedupe``) so every way embeds every row.

    .venv/bin/python bench/cpu_scaling.py                        # 6,000 texts, 3 rounds, K = cores
    .venv/bin/python bench/cpu_scaling.py --texts 20000 --workers 2,4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_bench import bench_texts  # noqa: E402

SUMMARY = re.compile(r"Embedded (\d+) rows .* in ([0-9.]+)s: ([0-9.]+) docs/s")


def run(corpus: Path, extra: list[str], env: dict[str, str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="cpu-scaling-") as work:
        cmd = [sys.executable, "-m", "tweet_embed", "embed", str(corpus), "--work-dir", work, "--no-dedupe"]
        cmd += ["--chunk-size", "2000", "--log-interval", "3600", *extra]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    m = SUMMARY.search(r.stdout + r.stderr)
    if r.returncode != 0 or m is None:
        sys.exit(f"{' '.join(extra)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return float(m.group(3)), int(m.group(1)) / wall


def main() -> None:
    from tweet_embed.procs import available_cores

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    ap.add_argument("--workers", default=str(available_cores()), help="K values for the K-process ways")
    ap.add_argument("--json", help="write the table here as JSON")
    args = ap.parse_args()
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    model = ["--model", args.model] if args.model else []
    ways: dict[str, tuple[list[str], dict[str, str]]] = {
        "1 process, THROUGHPUT streams (default)": (model, base),
        "1 process, LATENCY (one stream, all threads)": (
            model,
            {**base, "TWEET_EMBED_OPENVINO_HINT": "LATENCY"},
        ),
    }
    for k in (int(x) for x in args.workers.split(",") if x):
        ways[f"{k} processes (--devices cpu --workers-per-device {k})"] = (
            [*model, "--devices", "cpu", "--workers-per-device", str(k)],
            base,
        )
    with tempfile.TemporaryDirectory(prefix="cpu-scaling-corpus-") as d:
        corpus = Path(d) / "corpus.jsonl"
        with open(corpus, "w") as fh:
            for i, (_, t) in enumerate(bench_texts(args.texts, seed=13)):
                fh.write(json.dumps({"_id": str(i), "text": t}) + "\n")
        run(corpus, model, base)  # warm: the OpenVINO export cache, page cache
        got: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        for r in range(args.rounds):
            for w, (extra, env) in ways.items():
                got[w].append(run(corpus, extra, env))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"\n{args.texts} texts, {args.rounds} interleaved rounds, {available_cores()} cores\n")
    print("| way | run docs/s best | median | command docs/s (with start-up) best |")
    print("|---|---|---|---|")
    rows = []
    for w, vals in got.items():
        runs = [v[0] for v in vals]
        walls = [v[1] for v in vals]
        rows.append({"way": w, "best": max(runs), "median": statistics.median(runs), "wall_best": max(walls)})
        print(f"| {w} | {max(runs):,.0f} | {statistics.median(runs):,.0f} | {max(walls):,.0f} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"texts": args.texts, "cores": available_cores(), "rows": rows})
        )


if __name__ == "__main__":
    main()
