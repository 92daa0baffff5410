#!/usr/bin/env python3
"""Consolidation at scale: peak RSS and MB/s over >= 5 GB of shards, beside a plain copy of the same bytes.

What it does:
1. writes ``--gb`` GB of shards (``--rows-per-shard`` rows each, embed's default chunk size, 384-d float32,
   ~0.1 % duplicate ids) into a temporary directory on the disk with the most free space (/work or /tmp);
2. runs ``tweet-embed consolidate`` as a subprocess, reads its peak RSS with ``os.wait4`` (the kernel's
   ``ru_maxrss`` of that child) and samples /proc/PID/status while it runs;
3. copies the same shard bytes with ``cp -r`` + ``sync`` (the disk's plain copy speed on this machine);
4. checks the manifest (rows = shard rows - duplicates) and prints a JSON record, also written to
   ``bench/results/consolidate.json``.

Both the consolidation and the copy read shards that are (mostly) in the page cache after step 1 and end with
their output fsynced, so the comparison is write path against write path.

    .venv/bin/python bench/consolidate_bench.py            # 5.2 GB, about 3-5 minutes on 2 cores
    .venv/bin/python bench/consolidate_bench.py --gb 0.5   # quick look
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

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from tweet_embed.parquet import make_table, write_table  # noqa: E402


def pick_dir(need: int, explicit: str | None) -> str:
    if explicit:
        return explicit
    best = max(
        ("/work", tempfile.gettempdir()), key=lambda d: shutil.disk_usage(d).free if os.path.isdir(d) else 0
    )
    free = shutil.disk_usage(best).free
    if free < need:
        sys.exit(f"not enough free disk: {free / 1e9:.1f} GB in {best}, need {need / 1e9:.1f} GB")
    return best


def generate(
    shards_dir: str, gb: float, dim: int, rows_per_shard: int, seed: int = 0
) -> tuple[int, int, int]:
    """Write shards like embed does; returns (shards, rows, duplicate rows)."""
    os.makedirs(shards_dir)
    rng = np.random.default_rng(seed)
    goal = int(gb * 1e9)  # shard bytes on disk (zstd takes ~8 % off normalised float32, so count real bytes)
    meta = {
        "backend": "local",
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "dim": str(dim),
        "normalize": "true",
        "version": "bench",
    }
    next_id = 1_600_000_000_000_000_000
    dups = 0
    written = 0
    prev: list[str] = []
    on_disk = 0
    s = 0
    while on_disk < goal:
        n = rows_per_shard
        ids = [str(next_id + i) for i in range(n)]
        next_id += n
        if prev:  # ~0.1 % of rows repeat an id of the previous shard (a re-embedded chunk, say)
            k = max(1, n // 1000)
            for j in rng.choice(n, k, replace=False):
                ids[int(j)] = prev[int(j)]
            dups += k
        prev = ids
        v = rng.standard_normal((n, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        path = os.path.join(shards_dir, f"part-{s // 10_000:04d}-{s:07d}.parquet")
        write_table(make_table(ids, v, meta), path)
        on_disk += os.path.getsize(path)
        written += n
        s += 1
        if s % 50 == 0:
            print(f"  generated {s} shards, {on_disk / 1e9:.2f} GB", file=sys.stderr, flush=True)
    return s, written, dups


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))


CPU_SECONDS: dict[str, float] = {}


def run_measured(cmd: list[str]) -> tuple[float, int, int, str]:
    """Run ``cmd``; return (seconds, peak RSS bytes from wait4, max sampled RSS bytes, stderr tail).

    The child's user+system CPU seconds go to ``CPU_SECONDS[cmd[0] basename + first arg]`` (load-independent).
    """
    t0 = time.monotonic()
    err = tempfile.TemporaryFile()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    sampled = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal sampled
        while not stop.is_set():
            try:
                with open(f"/proc/{p.pid}/status") as fh:
                    for line in fh:
                        if line.startswith("VmRSS:"):
                            sampled = max(sampled, int(line.split()[1]) * 1024)
            except OSError:
                pass
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.monotonic() - t0
    CPU_SECONDS["last"] = ru.ru_utime + ru.ru_stime
    stop.set()
    th.join()
    err.seek(0)
    tail = err.read().decode(errors="replace")[-3000:]
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{tail}")
    return secs, ru.ru_maxrss * 1024, sampled, tail


def write_record(out: str, record: dict) -> None:
    """The run's record: to ``out`` (the results file) and to stdout."""
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
    print(json.dumps(record, indent=1))


def scale_ids(args: argparse.Namespace) -> None:
    """Many ids, tiny vectors: consolidate's dedupe and verify's id checks at ``--scale-ids`` rows, peak RSS."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from tweet_embed.parquet import shard_schema

    n, per = args.scale_ids, 1_000_000
    parent = pick_dir(n * 120, args.dir)
    work = tempfile.mkdtemp(prefix="consolidate-scale-", dir=parent)
    shards, out, inp = (os.path.join(work, x) for x in ("shards", "consolidated", "tweets.jsonl"))
    os.makedirs(shards)
    dim = 4
    schema = shard_schema(
        dim, {"backend": "local", "model": "bench/tiny", "dim": str(dim), "normalize": "true"}
    )
    rng = np.random.default_rng(0)
    t0 = time.monotonic()
    dups = 0
    with open(inp, "wb") as fh:
        for s, lo in enumerate(range(0, n, per)):
            k = min(per, n - lo)
            nums = np.arange(lo, lo + k, dtype=np.int64) + 1_600_000_000_000_000_000
            if lo:  # 0.1 % of rows repeat an id of the first shard (never replaced, so always there)
                j = rng.choice(k, k // 1000, replace=False)
                nums[j] = rng.integers(1_600_000_000_000_000_000, 1_600_000_000_000_000_000 + per, len(j))
                dups += len(j)
            ids = pc.cast(pa.array(nums), pa.string())
            vec = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(k * dim, dtype=np.float32)), dim)
            write_table(
                pa.Table.from_arrays([ids, vec.cast(schema.field("embedding").type)], schema=schema),
                os.path.join(shards, f"part-{s // 10_000:04d}-{s:07d}.parquet"),
            )
            lines = pc.binary_join_element_wise('{"_id":"', ids, '","text":"t"}', "")
            fh.write(("\n".join(lines.to_pylist()) + "\n").encode())
            print(f"  generated {lo + k} ids", file=sys.stderr, flush=True)
    gen_s = time.monotonic() - t0
    try:
        c_s, c_rss, _, c_log = run_measured(
            [sys.executable, "-m", "tweet_embed", "consolidate", "--shards-dir", shards, "--out-dir", out]
        )
        c_cpu = CPU_SECONDS["last"]
        with open(os.path.join(out, "_manifest.json")) as fh:
            m = json.load(fh)
        assert m["rows"] == n - dups == m["source"]["rows"] - m["duplicates"]["rows_dropped"], (
            m["rows"],
            n,
            dups,
        )
        v_s, v_rss, _, v_log = run_measured(
            [
                sys.executable,
                "-m",
                "tweet_embed",
                "verify",
                inp,
                "--out-dir",
                out,
                "--shards-dir",
                shards,
                "--temp-dir",
                work,
            ]
        )
        record = {
            "what": "ids at scale: consolidate (dedupe + write) and verify, tiny 4-d vectors",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
            "ids": n,
            "duplicate_rows": dups,
            "generate_s": round(gen_s, 1),
            "consolidate_s": round(c_s, 1),
            "consolidate_cpu_s": round(c_cpu, 1),
            "consolidate_peak_rss_MiB": round(c_rss / 2**20, 1),
            "verify_s": round(v_s, 1),
            "verify_cpu_s": round(CPU_SECONDS["last"], 1),
            "verify_peak_rss_MiB": round(v_rss / 2**20, 1),
            "consolidate_log_tail": c_log.splitlines()[-4:],
            "verify_log_tail": v_log.splitlines()[-4:],
        }
        write_record(args.out, record)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=5.2, help="shard bytes to generate")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--rows-per-shard", type=int, default=10_000)
    ap.add_argument("--target-size", default="2GB")
    ap.add_argument(
        "--dir", help="parent directory for the temporary data (default: most free of /work, /tmp)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "consolidate.json"))
    ap.add_argument(
        "--scale-ids", type=int, help="instead: this many ids with tiny vectors (dedupe + verify)"
    )
    args = ap.parse_args()
    if args.scale_ids:
        if args.out.endswith("consolidate.json"):
            args.out = args.out.replace("consolidate.json", "consolidate_scale.json")
        return scale_ids(args)

    parent = pick_dir(int(args.gb * 1e9 * 3.3), args.dir)
    work = tempfile.mkdtemp(prefix="consolidate-bench-", dir=parent)
    shards, out, copy = (os.path.join(work, x) for x in ("shards", "consolidated", "copy"))
    try:
        print(f"generating {args.gb} GB of shards in {shards}", file=sys.stderr)
        t0 = time.monotonic()
        n_shards, rows, dups = generate(shards, args.gb, args.dim, args.rows_per_shard)
        gen_s = time.monotonic() - t0
        nbytes = dir_bytes(shards)
        subprocess.run(["sync"], check=True)

        print("consolidating", file=sys.stderr)
        cmd = [
            sys.executable,
            "-m",
            "tweet_embed",
            "consolidate",
            "--shards-dir",
            shards,
            "--out-dir",
            out,
            "--target-size",
            args.target_size,
        ]
        c_s, c_rss, c_sampled, c_log = run_measured(cmd)
        c_cpu = CPU_SECONDS["last"]
        with open(os.path.join(out, "_manifest.json")) as fh:
            manifest = json.load(fh)
        assert manifest["rows"] == rows - dups, (manifest["rows"], rows, dups)
        assert manifest["duplicates"]["rows_dropped"] == dups

        print("copying the same bytes with cp -r + sync", file=sys.stderr)
        cp_s, cp_rss, _, _ = run_measured(["sh", "-c", f"cp -r '{shards}' '{copy}' && sync"])

        record = {
            "what": "tweet-embed consolidate vs cp -r of the same shards (same disk, same machine)",
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {
                "cpus": os.cpu_count(),
                "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "data_dir": parent,
                "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
            },
            "shards": n_shards,
            "rows": rows,
            "duplicate_rows": dups,
            "dim": args.dim,
            "shard_bytes": nbytes,
            "output_files": len(manifest["files"]),
            "output_bytes": sum(f["bytes"] for f in manifest["files"]),
            "row_groups": sum(f["row_groups"] for f in manifest["files"]),
            "generate_s": round(gen_s, 1),
            "consolidate_s": round(c_s, 1),
            "consolidate_cpu_s": round(c_cpu, 1),
            "consolidate_MB_per_cpu_s": round(nbytes / 1e6 / c_cpu, 1),
            "consolidate_MBps": round(nbytes / 1e6 / c_s, 1),
            "consolidate_peak_rss_MiB": round(c_rss / 2**20, 1),
            "consolidate_sampled_rss_MiB": round(c_sampled / 2**20, 1),
            "cp_s": round(cp_s, 1),
            "cp_MBps": round(nbytes / 1e6 / cp_s, 1),
            "consolidate_log_tail": c_log.splitlines()[-8:],
        }
        write_record(args.out, record)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
