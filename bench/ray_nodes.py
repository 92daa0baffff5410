#!/usr/bin/env python3
"""``--engine ray`` on 1, 2 and 3 worker nodes against a fixed-capacity server pool: docs/s, overhead, duplicates.

A multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head with no CPU for tasks (it holds
the driver, as on a real cluster) and 1, 2 or 3 worker nodes of one CPU each, each its own raylet. The servers
are ``--servers`` test servers (``tweet_embed.testing.server``, each in its own process) in capacity mode: each a
simulated GPU doing ``--capacity`` docs/s in arrival order, 429 past ``max_concurrent_requests`` queued inputs,
answers precomputed (``precomputed=True``) so that the servers' CPU is not the limit. The pool's capacity is
therefore fixed: more nodes cannot make it faster, only show what scheduling across nodes costs.

Per node count, on the same input (``--lines`` synthetic tweets in chunks of ``--chunk``):

* ``docs_per_s`` (rows), ``texts_per_s`` and ``of_capacity`` (distinct texts sent a second — dedupe, the
  default, sends each once — over the pool's capacity: the share of the GPUs kept busy);
* ``overhead_s``: wall time minus ``distinct texts / capacity`` (the least time the pool needs): start-up of the run
  (plan, manifest, first requests), the pipeline's ramp-up and tail, and Ray's scheduling;
* ``duplicates``: distinct texts the servers answered (status 200) more than once (0: nothing embedded twice),
  ``missing``: distinct texts never answered, ``rows_ok``: the shards hold every id exactly once; ``probes``: the
  one request each client sends when it starts (the driver's, and one per Ray worker process), not input;
* ``429``: overload answers (retried by the client; not duplicates).

The same is measured for the local engine (one process, its defaults) as the reference for what one client
gets from the pool. Configurations run in interleaved rounds (``--repeats``; the order alternates), the best of
each is kept, so a busy machine hits them alike; before each timed run a short warm-up run makes sure every
node's Ray worker process has started (a new node's first task pays for it; a long run pays it once).
Per-node scaling cannot show on a 2-core machine (the nodes share the cores): the point is that the cluster
keeps the pool as busy as one process does, with nothing duplicated.

Writes ``bench/results/ray_nodes.json``.

    .venv/bin/python bench/ray_nodes.py            # 40k lines, 2 rounds: about 5 minutes on 2 cores
    .venv/bin/python bench/ray_nodes.py --quick    # 12k lines, one round
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
from collections import Counter
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
RESULTS = os.path.join(HERE, "results")

import pyarrow.parquet as pq  # noqa: E402

from ray_vs_local import embed_once  # noqa: E402  (bench/ is sys.path[0] when a script here runs)
from tweet_embed.backends import BackendSpec  # noqa: E402
from tweet_embed.embed.engines.ray import RayOptions  # noqa: E402
from tweet_embed.testing.server import ServerProcess, TEIServer  # noqa: E402
from tweet_embed.testing.synth import write_jsonl  # noqa: E402


def one_run(
    path: str, work: str, spec: BackendSpec, chunk: int, ray_opts: RayOptions | None
) -> dict[str, Any]:
    s, wall = embed_once(path, work, spec, chunk, ray_opts)
    ids: list[str] = []
    for name in sorted(os.listdir(os.path.join(work, "shards"))):
        ids += pq.read_table(os.path.join(work, "shards", name), columns=["id"]).column("id").to_pylist()
    return {"rows": s.rows, "chunks": s.chunks_done_now, "seconds": wall, "ids": ids}


def answered(servers: list[ServerProcess]) -> Counter[str]:
    """Texts the pool answered with 200, over all servers (a 429'd request was not embedded)."""
    out: Counter[str] = Counter()
    for srv in servers:
        for r in srv.received:
            if r.route == "embed" and r.status == 200:
                out.update(r.texts)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=40_000)
    ap.add_argument("--chunk", type=int, default=2_000, help="lines per chunk")
    ap.add_argument("--servers", type=int, default=2, help="test servers in the pool (one 'GPU' each)")
    ap.add_argument("--capacity", type=float, default=1_000.0, help="docs/s of each server")
    ap.add_argument("--max-concurrent-requests", type=int, default=512, help="each server's queue, in inputs")
    ap.add_argument("--nodes", default="1,2,3", help="worker node counts")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="rounds over all configurations; the best is kept")
    ap.add_argument("--quick", action="store_true", help="12k lines, one round")
    ap.add_argument("--out", default=os.path.join(RESULTS, "ray_nodes.json"))
    args = ap.parse_args()
    if args.quick:
        args.lines, args.repeats = 12_000, 1
    node_counts = [int(x) for x in args.nodes.split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="ray-nodes-")
    path, warm = os.path.join(tmp, "tweets.jsonl"), os.path.join(tmp, "warm.jsonl")
    write_jsonl(path, args.lines, seed=1)
    write_jsonl(warm, 8 * max(node_counts), seed=2)
    with open(path, "rb") as src:
        texts = Counter(json.loads(line)["text"] for line in src)
    capacity = args.servers * args.capacity
    results: dict[str, Any] = {
        "machine": {
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "load_average_before": [round(x, 1) for x in os.getloadavg()],
            "note": "a 2-core box shared with other work: figures are the best of interleaved rounds",
        },
        "input": {"lines": args.lines, "chunk_lines": args.chunk, "chunks": -(-args.lines // args.chunk)},
        "pool": {
            "servers": args.servers,
            "docs_per_s_each": args.capacity,
            "capacity_docs_per_s": capacity,
            "max_concurrent_requests": args.max_concurrent_requests,
            "least_seconds": round(args.lines / capacity, 2),
        },
    }
    runs: dict[str, dict[str, Any]] = {}
    servers = [
        TEIServer.spawn_process(
            dim=args.dim,
            precomputed=True,
            track_texts=True,  # which texts were answered: the duplicate check
            capacity=args.capacity,
            max_concurrent_requests=args.max_concurrent_requests,
        )
        for _ in range(args.servers)
    ]
    cluster = None
    try:
        spec = BackendSpec(urls=tuple(s.embed_url for s in servers))
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,  # the head holds the driver; chunks run on the worker nodes only
                "include_dashboard": False,
                "_system_config": {"health_check_period_ms": 300, "health_check_failure_threshold": 3},
            },
        )
        ray.init(address=cluster.address, log_to_driver=False)
        workers: list[Any] = []

        def resize(n: int) -> None:
            while len(workers) < n:
                workers.append(cluster.add_node(num_cpus=1))
            while len(workers) > n:
                cluster.remove_node(workers.pop())
            cluster.wait_for_nodes()
            deadline = time.monotonic() + 30
            while ray.cluster_resources().get("CPU", 0) != n and time.monotonic() < deadline:
                time.sleep(0.1)

        def measure(name: str, ray_opts: RayOptions | None) -> None:
            one_run(warm, os.path.join(tmp, "w"), spec, 8, ray_opts)  # every node's worker process up
            for s in servers:
                s.reset_counters()
            r = one_run(path, os.path.join(tmp, "w"), spec, args.chunk, ray_opts)
            got = answered(servers)
            row = {
                "rows": r["rows"],
                "chunks": r["chunks"],
                "seconds": round(r["seconds"], 2),
                "docs_per_s": round(r["rows"] / r["seconds"], 1),
                # the servers' work is the distinct texts (dedupe, the default, sends each once)
                "texts_per_s": round(len(texts) / r["seconds"], 1),
                "of_capacity": round(len(texts) / r["seconds"] / capacity, 3),
                "overhead_s": round(r["seconds"] - len(texts) / capacity, 2),
                # a distinct text of the input answered more than once, or never; each client's start-up
                # probe ("dimension probe", not in the input) is counted apart
                "duplicates": sum(max(0, got[t] - 1) for t in texts),
                "missing": sum(1 for t in texts if got[t] == 0),
                "probes": sum(n for t, n in got.items() if t not in texts),
                "rows_ok": len(r["ids"]) == len(set(r["ids"])) == args.lines,
                "429": sum(s.counters["429"] for s in servers),
            }
            if name not in runs or row["seconds"] < runs[name]["seconds"]:
                runs[name] = row
            print(f"{name:8s} {row}", flush=True)

        for rnd in range(args.repeats):  # interleaved; the order alternates so no count always runs first
            order = node_counts if rnd % 2 == 0 else node_counts[::-1]
            measure("local", None)
            for n in order:
                resize(n)
                measure(f"nodes_{n}", RayOptions())
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    results["machine"]["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
    results["runs"] = runs
    results["summary"] = {
        "docs_per_s": {k: v["docs_per_s"] for k, v in runs.items()},
        "of_capacity": {k: v["of_capacity"] for k, v in runs.items()},
        "overhead_s": {k: v["overhead_s"] for k, v in runs.items()},
        "duplicates": sum(v["duplicates"] for v in runs.values()),
        "all_rows_exactly_once": all(v["rows_ok"] and not v["missing"] for v in runs.values()),
    }
    print(json.dumps(results["summary"], indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
        fh.write("\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
