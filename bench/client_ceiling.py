#!/usr/bin/env python3
"""Client throughput ceiling: is ``tweet-embed embed`` ever the bottleneck in front of fast GPUs?

A fast server (``bench/fast_server.py`` in its own process: the test server's answer bodies cached and sent
from a bare asyncio protocol, so the server is never the limit and takes little of the shared cores;
``--server testserver`` uses ``tweet_embed.testing.server``'s fast mode instead) answers every request. On the same generated input
(``--lines``, default 200k tweet-like JSONL lines) and in one run, at 384 and 1,024 dimensions:

1. ``naive``: ``bench/naive_client.py`` (aiohttp, ``await resp.json()``, batches of 32, 8 requests in
   flight, a pyarrow write per 10k rows), the reference;
2. ``embed_json``: ``tweet-embed embed --tei-urls`` (TEI ``/embed``, JSON floats);
   ``embed_base64``: ``tweet-embed embed --openai-urls`` (``/v1/embeddings``, ``encoding_format: base64``);
3. ``limit_json`` / ``limit_base64``: the decode-and-write limit: the same answer bodies decoded and the
   shards written (the same code: ``tweet_embed.backends.decode`` and ``worker.commit_chunk``'s Parquet write,
   sha256 and fsync) in a tight loop, in one process pinned to one core.

Then: peak RSS of ``embed`` over ``--rss-lines`` (default 2M) lines against the 200k-line run, and the time
of resuming a finished run of 1,000 chunks (and the requests it sent: none).

Every run is a subprocess; wall time includes Python start-up (``x_limit``); ``x_limit_own_clock`` uses
``embed``'s own clock (start of the run to its last shard), like the limit's loop. Peak RSS: the kernel's ``ru_maxrss`` of the
main process (``os.wait4``) and the sampled sum over its process tree (decode workers included). The server
has the same batch limit for everybody (TEI's default ``max_client_batch_size`` 32).

Writes ``bench/results/client_ceiling.json`` and ``client_ceiling.png`` (matplotlib, from the dev extra).

    .venv/bin/python bench/client_ceiling.py            # about 10 minutes on 2 cores
    .venv/bin/python bench/client_ceiling.py --quick    # 20k lines, no 2M-line RSS run, 100-chunk resume
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
RESULTS = os.path.join(HERE, "results")
BATCH = 32  # TEI's default max_client_batch_size, for every client
CHUNK = 10_000  # tweet-embed's default chunk, and the naive client's rows per file


# --------------------------------------------------------------------------------------------- helpers


def tree_rss(root: int) -> int:
    """Sum of VmRSS (bytes) over ``root`` and its descendants, from /proc."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                todo.extend(int(c) for c in fh.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


CLIENT_CPUS: set[int] | None = None  # --client-cpus: every client run is pinned there


def _pin() -> None:
    if CLIENT_CPUS:
        os.sched_setaffinity(0, CLIENT_CPUS)


def cpu_list(text: str | None) -> set[int] | None:
    return {int(c) for c in text.split(",")} if text else None


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, exit code, output, peak RSS of the main process and of its tree."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    out = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=e, cwd=ROOT, preexec_fn=_pin)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-3000:]}")
    return {
        "seconds": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the process and its reaped children (decode workers)
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "peak_tree_rss_mb": peak[0] / 2**20,
        "output": text,
    }


def post(url: str, payload: dict[str, Any]) -> bytes:
    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read()


def embed_cmd(inp: str, work: str, flag: str, url: str, workers: int | None, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "tweet_embed", "-q", "embed", inp, flag, url, "--work-dir", work, *extra]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return cmd


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- decode-and-write limit


def limit_worker(args: argparse.Namespace) -> None:
    """(Child process, pinned to one core.) Decode ``--body`` ``lines/32`` times and write the shards."""
    import numpy as np

    from tweet_embed.backends.decode import DECODERS
    from tweet_embed.embed.chunks import Chunk, WorkDirs
    from tweet_embed.embed.worker import ChunkResult, commit_chunk

    os.sched_setaffinity(0, {args.cpu})
    with open(args.body, "rb") as fh:
        body = fh.read()
    decode = DECODERS[args.kind]
    dirs = WorkDirs.from_options(args.work, None, None, None)
    dirs.create()
    ids_all = [str(1_600_000_000_000_000_000 + i) for i in range(args.lines)]
    md = {"backend": "bench", "model": "m", "dim": str(args.dim), "normalize": "true", "version": "0"}
    t0 = time.perf_counter()
    c0 = time.process_time()
    done = 0
    ci = 0
    while done < args.lines:
        n = min(CHUNK, args.lines - done)
        out = np.empty((n, args.dim), dtype=np.float32)
        for lo in range(0, n, BATCH):
            hi = min(n, lo + BATCH)
            vec = decode(body, BATCH, args.dim)
            out[lo:hi] = vec[: hi - lo]
        chunk = Chunk(0, ci, done + 1, n, 0, 0)
        commit_chunk(dirs, chunk, ChunkResult(ids_all[done : done + n], out, [], n), md)
        done += n
        ci += 1
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    print(json.dumps({"rows": done, "seconds": dt, "docs_per_s": done / dt, "cpu_s": cpu}))


# ------------------------------------------------------------------------------------------------ main


def parse_summary(output: str) -> float | None:
    """docs/s from tweet-embed's summary line (its own clock: from start to the last shard)."""
    for line in output.splitlines():
        if line.startswith("Embedded ") and "docs/s" in line:
            return float(line.rsplit(":", 1)[1].split()[0])
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=200_000)
    p.add_argument("--rss-lines", type=int, default=2_000_000, help="0 to skip the peak-RSS scaling run")
    p.add_argument("--resume-chunks", type=int, default=1000)
    p.add_argument("--dims", default="384,1024")
    p.add_argument("--workers", type=int, help="tweet-embed --workers (default: its own, all cores)")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every configuration; the best is kept")
    p.add_argument("--client-cpus", help="pin the clients to these CPUs, e.g. 0,1 (default: all)")
    p.add_argument("--server-cpus", help="pin the test server to these CPUs, e.g. 2,3 (default: all)")
    p.add_argument(
        "--server",
        choices=("fast", "testserver"),
        default="fast",
        help="fast: bench/fast_server.py (cached bodies, ~30 µs per request); testserver: "
        "tweet_embed.testing.server's fast mode (aiohttp, validates like TEI, ~180 µs per request)",
    )
    p.add_argument("--quick", action="store_true", help="20k lines, no RSS run, 100-chunk resume")
    p.add_argument("--out", default=os.path.join(RESULTS, "client_ceiling.json"))
    p.add_argument("--limit-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--body", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.limit_worker:
        limit_worker(args)
        return 0
    if args.quick:
        args.lines, args.rss_lines, args.resume_chunks = 20_000, 0, 100
    global CLIENT_CPUS
    CLIENT_CPUS = cpu_list(args.client_cpus)

    from tweet_embed.backends import decode
    from tweet_embed.testing.synth import write_jsonl

    dims = [int(d) for d in args.dims.split(",")]
    tmp = tempfile.mkdtemp(prefix="client_ceiling.", dir="/tmp")
    record: dict[str, Any] = {
        "machine": {
            "cpus": decode.available_cores(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": loadavg(),
            "client_cpus": sorted(CLIENT_CPUS) if CLIENT_CPUS else "all",
            "server_cpus": args.server_cpus or "all",
            "server": args.server,
        },
        "lines": args.lines,
        "batch": BATCH,
        "accelerators": decode.accelerators(),
        "results": {},
    }
    try:
        inp = os.path.join(tmp, "tweets.jsonl")
        write_jsonl(inp, args.lines, seed=42)
        for dim in dims:
            res: dict[str, Any] = {}
            record["results"][str(dim)] = res
            with _server(args, dim) as srv:
                texts = [f"tweet {i}" for i in range(BATCH)]
                bodies = {
                    "limit_json": ("embed_json", post(srv.embed_url, {"inputs": texts, "truncate": True})),
                    "limit_base64": (
                        "openai_base64",
                        post(srv.openai_url, {"input": texts, "model": "m", "encoding_format": "base64"}),
                    ),
                }
                cmds: dict[str, list[str]] = {}
                if not args.skip_naive:
                    naive = os.path.join(HERE, "naive_client.py")
                    cmds["naive"] = [sys.executable, naive, "--input", inp, "--url", srv.embed_url, "--out"]
                cmds["embed_json"] = embed_cmd(inp, "", "--tei-urls", srv.embed_url, args.workers)
                cmds["embed_base64"] = embed_cmd(inp, "", "--openai-urls", srv.url + "/v1", args.workers)
                for name, (kind, body) in bodies.items():
                    bpath = os.path.join(tmp, f"{kind}.body")
                    with open(bpath, "wb") as fh:
                        fh.write(body)
                    cmds[name] = [
                        sys.executable,
                        __file__,
                        "--limit-worker",
                        "--body",
                        bpath,
                        "--kind",
                        kind,
                        "--dim",
                        str(dim),
                        "--cpu",
                        str(min(CLIENT_CPUS or {0})),
                        "--lines",
                        str(args.lines),
                        "--work",
                    ]
                # every configuration once per round, rounds interleaved: the machine's load hits all alike
                for rnd in range(args.repeat):
                    for name, cmd in cmds.items():
                        work = os.path.join(tmp, f"{name}{dim}")
                        cmd = [work if c == "" else c for c in cmd] + (
                            [work] if cmd[-1] in ("--out", "--work") else []
                        )
                        r = run_measured(cmd)
                        shutil.rmtree(work, ignore_errors=True)
                        row = _row(r, args.lines)
                        if name.startswith("limit"):
                            own = json.loads(r["output"].strip().splitlines()[-1])
                            row = {
                                "docs_per_s": own["docs_per_s"],
                                "cpu_s": round(own["cpu_s"], 2),
                                "docs_per_cpu_s": round(args.lines / own["cpu_s"], 1),
                                "cores": 1,
                            }
                        elif name.startswith("embed"):
                            row["own_clock_docs_per_s"] = parse_summary(r["output"])
                        if name == "naive":
                            row["client"] = "bench/naive_client.py, /embed JSON"
                        row["runs"] = res.get(name, {}).get("runs", []) + [round(row["docs_per_s"], 1)]
                        if name not in res or row["docs_per_s"] > res[name]["docs_per_s"]:
                            res[name] = row  # the best round (least disturbed by other load)
                        else:
                            res[name]["runs"] = row["runs"]
                        print(
                            f"{dim}d {name} (round {rnd + 1}): {row['docs_per_s']:,.0f} docs/s, "
                            f"{row['docs_per_cpu_s']:,.0f} docs per CPU-second"
                            + (f", peak RSS {row['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in row else ""),
                            flush=True,
                        )
            _ratios(res)
        _extra_runs(args, record, inp, tmp, dims)
        record["machine"]["loadavg_end"] = loadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=2)
    print(json.dumps(record, indent=2))
    _chart(record, os.path.splitext(args.out)[0] + ".png")
    return 0


def _row(r: dict[str, Any], lines: int) -> dict[str, Any]:
    return {
        "cpu_s": round(r["cpu_s"], 2),
        "docs_per_cpu_s": round(lines / r["cpu_s"], 1),
        "docs_per_s": lines / r["seconds"],
        "seconds": round(r["seconds"], 2),
        "peak_rss_mb": round(r["peak_rss_mb"], 1),
        "peak_tree_rss_mb": round(r["peak_tree_rss_mb"], 1),
    }


def _server(args: argparse.Namespace, dim: int) -> Any:
    if args.server == "fast":
        sys.path.insert(0, HERE)
        from fast_server import FastServer

        return FastServer.spawn(dim, cpus=cpu_list(args.server_cpus), batch=BATCH)
    from tweet_embed.testing.server import TEIServer

    return TEIServer.spawn_process(
        cpus=cpu_list(args.server_cpus), dim=dim, precomputed=True, max_client_batch_size=BATCH
    )


def _ratios(res: dict[str, Any]) -> None:
    base = res.get("naive")
    for name, limit in (("embed_json", "limit_json"), ("embed_base64", "limit_base64")):
        row = res[name]
        if base:
            row["x_naive"] = round(row["docs_per_s"] / base["docs_per_s"], 2)
            row["x_naive_per_cpu_s"] = round(row["docs_per_cpu_s"] / base["docs_per_cpu_s"], 2)
        row["x_limit"] = round(row["docs_per_s"] / res[limit]["docs_per_s"], 2)
        if row.get("own_clock_docs_per_s"):  # without interpreter start-up, like the limit's own clock
            row["x_limit_own_clock"] = round(row["own_clock_docs_per_s"] / res[limit]["docs_per_s"], 2)


def _extra_runs(
    args: argparse.Namespace, record: dict[str, Any], inp: str, tmp: str, dims: list[int]
) -> None:
    from tweet_embed.testing.synth import write_jsonl

    dim = dims[0]
    with _server(args, dim) as srv:
        url = srv.url + "/v1"
        if args.rss_lines:
            big = os.path.join(tmp, "big.jsonl")
            write_jsonl(big, args.rss_lines, seed=43)
            rows = {}
            for n, path in ((args.lines, inp), (args.rss_lines, big)):
                work = os.path.join(tmp, f"rss{n}")
                r = run_measured(embed_cmd(path, work, "--openai-urls", url, args.workers))
                rows[str(n)] = _row(r, n)
                shutil.rmtree(work, ignore_errors=True)
                print(
                    f"RSS {n} lines: main {rows[str(n)]['peak_rss_mb']:.0f} MB, "
                    f"tree {rows[str(n)]['peak_tree_rss_mb']:.0f} MB",
                    flush=True,
                )
            os.unlink(big)
            small, large = rows[str(args.lines)], rows[str(args.rss_lines)]
            record["peak_rss"] = {
                "dim": dim,
                "runs": rows,
                "ratio_main": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                "ratio_tree": round(large["peak_tree_rss_mb"] / small["peak_tree_rss_mb"], 3),
            }
        # resume of a finished run of N chunks (0: skipped)
        if args.resume_chunks:
            lines_per_chunk = max(1, args.lines // args.resume_chunks)
            work = os.path.join(tmp, "resume")
            cmd = embed_cmd(
                inp, work, "--openai-urls", url, args.workers, "--chunk-size", str(lines_per_chunk)
            )
            first = run_measured(cmd)
            before = srv.counters["requests"]
            again = run_measured(cmd)
            sent = srv.counters["requests"] - before
            n_chunks = len([n for n in os.listdir(os.path.join(work, "shards")) if n.endswith(".parquet")])
            record["resume"] = {
                "chunks": n_chunks,
                "first_run_s": round(first["seconds"], 2),
                "resume_s": round(again["seconds"], 3),
                "requests_sent": sent,
            }
            print(
                f"resume of {n_chunks} finished chunks: {again['seconds']:.2f}s, {sent} requests", flush=True
            )
            shutil.rmtree(work, ignore_errors=True)


def _chart(record: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[dev]'): no chart", file=sys.stderr)
        return
    names = ["naive", "embed_json", "embed_base64", "limit_json", "limit_base64"]
    labels = [
        "naive client\n(/embed JSON)",
        "tweet-embed\n/embed JSON",
        "tweet-embed\n/v1 base64",
        "decode+write\nlimit JSON\n(1 core)",
        "decode+write\nlimit base64\n(1 core)",
    ]
    dims = list(record["results"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.8 / len(dims)
    for ax, key, title in (
        (axes[0], "docs_per_s", "docs/s (wall clock)"),
        (axes[1], "docs_per_cpu_s", "docs per CPU-second (client processes only)"),
    ):
        for i, dim in enumerate(dims):
            res = record["results"][dim]
            vals = [res.get(n, {}).get(key, 0) for n in names]
            xs = [j + i * width for j in range(len(names))]
            bars = ax.bar(xs, vals, width, label=f"{dim} dimensions")
            for b, v in zip(bars, vals, strict=True):
                ax.annotate(
                    f"{v / 1000:.1f}k",
                    (b.get_x() + b.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks([j + width * (len(dims) - 1) / 2 for j in range(len(names))], labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    m = record["machine"]
    fig.suptitle(
        f"Client throughput: {record['lines']:,} lines, batches of {record['batch']}, {m['cpus']} cores "
        f"shared with the test server (load average {m['loadavg_start'][0]} at start)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart: {path}")


if __name__ == "__main__":
    sys.exit(main())
