#!/usr/bin/env python3
"""``--engine ray`` against the local engine on the same input: docs/s, and the overhead per chunk.

A fast test server (``tweet_embed.testing.server`` in its own process, ``precomputed=True``: cached answer bodies,
so the server is never the limit) answers TEI ``/embed`` requests at 384 dimensions. The same generated input
(``--lines`` tweet-like JSONL lines) is embedded by:

* ``local``: the local engine (one process; response decoding in as many processes as cores, the CLI's
  default; 3 chunks in flight);
* ``ray``: the Ray engine on a local Ray instance (``ray.init(num_cpus=cores)``), one task per chunk, one CPU
  each, every worker process with its own client; ``ray_half_cpu``: ``--ray-cpus-per-task 0.5`` (two tasks per
  core, so one task's reading and writing overlaps another's embedding).

Throughput: docs/s at the default chunk size (``--big``) and at ``--small``; ``local_decode_thread`` is the local
engine decoding in one thread (no decode processes to start). Overhead per chunk: inputs cut into one-line chunks,
where a chunk's own work is nearly nil, ``--tiny-chunks`` of them and a fifth as many; the difference of the two
times over the difference of the counts is what one more chunk costs beyond its rows, fixed costs cancelled (both
engines: a Parquet file, a marker, their fsyncs; Ray: scheduling, argument and result transfer), at each engine's
concurrency and with one chunk in flight.

Times are those of ``run_embed`` (plan, manifest, embedding, markers, rejects merge). Ray's start-up
(``ray.init``) is measured apart, once, since a cluster is started once for many runs; the Ray worker processes
are warmed by one run first. The configurations are run in interleaved rounds (``--repeats``) and the best
of each is kept, so that other load on the machine affects both engines alike.

Writes ``bench/results/ray_vs_local.json``.

    .venv/bin/python bench/ray_vs_local.py              # 100k lines, 3 rounds: about 5 minutes on 2 cores
    .venv/bin/python bench/ray_vs_local.py --quick      # 20k lines, one round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
RESULTS = os.path.join(HERE, "results")

from tweet_embed.backends import BackendSpec  # noqa: E402
from tweet_embed.embed.chunks import WorkDirs  # noqa: E402
from tweet_embed.embed.engines.ray import RayOptions  # noqa: E402
from tweet_embed.embed.runner import EmbedOptions, Summary, run_embed  # noqa: E402
from tweet_embed.testing.server import TEIServer  # noqa: E402
from tweet_embed.testing.synth import write_jsonl  # noqa: E402


def embed_once(
    path: str,
    work: str,
    spec: BackendSpec,
    chunk: int,
    ray_opts: RayOptions | None,
    chunks_in_flight: int = 3,
) -> tuple[Summary, float]:
    """``run_embed`` of ``path`` into a fresh ``work`` (``ray_opts`` None: the local engine): its summary and
    wall seconds.  Also bench/ray_nodes.py's run."""
    shutil.rmtree(work, ignore_errors=True)
    opts = EmbedOptions(
        inputs=[path],
        dirs=WorkDirs.from_options(work, None, None, None),
        chunk_lines=chunk,
        log_interval=3600,
        ray=ray_opts,
        chunks_in_flight=chunks_in_flight,
    )
    t0 = time.perf_counter()
    s = run_embed(opts, spec)
    return s, time.perf_counter() - t0


def figures(chunk: int, s: Summary, wall: float) -> dict[str, Any]:
    """A run's row: what :func:`embed_once` returned, at ``chunk`` lines per chunk."""
    return {
        "chunk_lines": chunk,
        "chunks": s.chunks_done_now,
        "rows": s.rows,
        "seconds": round(wall, 3),
        "docs_per_s": round(s.rows / wall, 1),
        "ms_per_chunk": round(1000 * wall / max(1, s.chunks_done_now), 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--big", type=int, default=10_000, help="lines per chunk (the default chunk size)")
    ap.add_argument("--small", type=int, default=1_000, help="a smaller chunk size")
    ap.add_argument("--tiny-chunks", type=int, default=300, help="one-line chunks for the per-chunk overhead")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3, help="rounds over all configurations; the best is kept")
    ap.add_argument("--quick", action="store_true", help="20k lines, 100 one-line chunks, one round")
    ap.add_argument("--out", default=os.path.join(RESULTS, "ray_vs_local.json"))
    args = ap.parse_args()
    if args.quick:
        args.lines, args.tiny_chunks, args.repeats = 20_000, 100, 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tempfile.mkdtemp(prefix="ray-vs-local-")
    path = os.path.join(tmp, "tweets.jsonl")
    write_jsonl(path, args.lines, seed=1)
    few, many = os.path.join(tmp, "few.jsonl"), os.path.join(tmp, "many.jsonl")
    n_few, n_many = max(1, args.tiny_chunks // 5), args.tiny_chunks
    write_jsonl(few, n_few, seed=2)
    write_jsonl(many, n_many, seed=2)

    import ray

    results: dict[str, Any] = {
        "machine": {
            "cores": cores,
            "python": platform.python_version(),
            "ray": ray.__version__,
            "load_average_before": [round(x, 1) for x in os.getloadavg()],
        },
        "input": {
            "lines": args.lines,
            "dim": args.dim,
            "server": "tweet_embed.testing.server precomputed, own process",
            "max_client_batch_size": 32,
            "local_decode_workers": cores,
        },
    }
    # (name, input, chunk lines, Ray options or None for the local engine, chunks in flight)
    configs: list[tuple[str, str, int, RayOptions | None, int]] = [
        ("local", path, args.big, None, 3),
        ("ray", path, args.big, RayOptions(), 3),
        ("ray_half_cpu", path, args.big, RayOptions(cpus_per_task=0.5), 3),
        ("local_decode_thread", path, args.big, None, 3),
        ("local", path, args.small, None, 3),
        ("ray", path, args.small, RayOptions(), 3),
    ]
    for label, inp in (("few", few), ("many", many)):  # one-line chunks: the slope is the cost of a chunk
        configs += [
            (f"local_{label}", inp, 1, None, 3),
            (f"ray_{label}", inp, 1, RayOptions(), 3),
            (f"local_serial_{label}", inp, 1, None, 1),
            (f"ray_serial_{label}", inp, 1, RayOptions(in_flight=1), 3),
        ]
    runs: dict[str, dict[str, Any]] = {}
    try:
        with TEIServer.spawn_process(dim=args.dim, precomputed=True, max_client_batch_size=32) as srv:
            spec = BackendSpec(urls=(srv.embed_url,), workers=cores)  # the CLI's default: all cores
            thread_spec = BackendSpec(urls=(srv.embed_url,))  # decoding in one thread of the process
            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=True)
            results["ray_init_seconds"] = round(time.perf_counter() - t0, 2)
            print(f"ray.init: {results['ray_init_seconds']}s", flush=True)
            try:
                embed_once(path, os.path.join(tmp, "w"), spec, args.big, RayOptions())  # start the workers
                for _ in range(args.repeats):  # rounds interleave the engines: a busy machine hits both alike
                    for name, inp, chunk, ropts, cif in configs:
                        key = f"{name}@{chunk}"
                        which = thread_spec if name == "local_decode_thread" else spec
                        r = figures(chunk, *embed_once(inp, os.path.join(tmp, "w"), which, chunk, ropts, cif))
                        if key not in runs or r["seconds"] < runs[key]["seconds"]:
                            runs[key] = r
                        print(f"{key:26s} {r}", flush=True)
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    big, small = args.big, args.small

    def slope(name: str) -> float:
        return round(
            1000 * (runs[f"{name}_many@1"]["seconds"] - runs[f"{name}_few@1"]["seconds"]) / (n_many - n_few),
            2,
        )

    summary: dict[str, Any] = {
        "docs_per_s": {
            name: runs[f"{name}@{big}"]["docs_per_s"]
            for name in ("local", "local_decode_thread", "ray", "ray_half_cpu")
        },
        "docs_per_s_small_chunks": {name: runs[f"{name}@{small}"]["docs_per_s"] for name in ("local", "ray")},
        "overhead_ms_per_chunk": {
            "local": slope("local"),
            "ray": slope("ray"),
            "local_one_in_flight": slope("local_serial"),
            "ray_one_in_flight": slope("ray_serial"),
        },
    }
    d = summary["docs_per_s"]
    summary["ray_vs_local_throughput"] = round(d["ray"] / d["local"], 3)
    m = summary["overhead_ms_per_chunk"]
    summary["ray_extra_ms_per_chunk"] = round(m["ray"] - m["local"], 2)
    summary["ray_extra_ms_per_chunk_one_in_flight"] = round(
        m["ray_one_in_flight"] - m["local_one_in_flight"], 2
    )
    results["machine"]["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    results["runs"] = runs
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
