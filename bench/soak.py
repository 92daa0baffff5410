"""Soak: a million lines through a fault-injecting pool of TEI-compatible servers, with crashes, then an
exactly-once check of the whole output.

What it does (defaults):

* writes ``--lines`` synthetic tweets as JSONL, with one bad line (malformed JSON, missing id, null text,
  an array...) after every 997 good ones, so rejects are exercised too;
* starts ``--servers`` test servers in their own processes, each answering 10% 429, 5% 503, dropping 2% of
  connections, hanging 0.1% of requests, and returning a wrong count / wrong dimension / NaN 0.5% each;
* runs the real CLI (``python -m tweet_embed embed``) against the pool; while it runs: at 25% of the chunks
  one server restarts (down for 5 s), at 50% another dies for good, and the pipeline itself is
  ``kill -9``-ed at 35% and 70% and re-run (resume);
* at the end checks: every valid id exactly once, in input order, with the bit-exact vector of its own
  text; every bad line in ``rejects.jsonl`` at its line number; every marker's sha256 matches its shard.

Prints a JSON report and writes it to ``--out`` (default ``bench/results/soak.json``): total time, docs/s,
client retries by cause (from the runs that finished; a killed run prints no summary), the faults each
server injected (all runs), events, and the check results. Exits 1 if a check fails.

    .venv/bin/python bench/soak.py                      # 1M lines
    .venv/bin/python bench/soak.py --lines 50000 --out /tmp/soak-small.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import orjson
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from tweet_embed.parquet import file_sha256  # noqa: E402
from tweet_embed.testing.server import TEIServer  # noqa: E402
from tweet_embed.testing.synth import synth_tweets  # noqa: E402

BAD_LINES = [
    b'{"_id": "broken", "text": ',
    b'["an", "array"]',
    b'{"text": "no id here"}',
    b'{"_id": "null-text", "text": null}',
    b'{"_id": "num-text", "text": 42}',
    b'{"_id": "empty", "text": ""}',
]
BAD_EVERY = 997
FAULTS = dict(
    p_429=0.10,
    p_503=0.05,
    p_drop=0.02,
    p_hang=0.001,
    hang_seconds=20.0,
    p_bad_count=0.005,
    p_bad_dim=0.005,
    p_nan=0.005,
)


def write_input(path: str, lines: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    """Write the corpus; return the valid ids and texts in order and the line numbers of the bad lines."""
    ids: list[str] = []
    texts: list[str] = []
    bad: list[int] = []
    lineno = 0
    buf: list[bytes] = []
    with open(path, "wb") as fh:
        for i, (rid, text) in enumerate(synth_tweets(lines, seed=seed)):
            if i and i % BAD_EVERY == 0:
                lineno += 1
                buf.append(BAD_LINES[len(bad) % len(BAD_LINES)] + b"\n")
                bad.append(lineno)
            lineno += 1
            buf.append(orjson.dumps({"_id": rid, "text": text}) + b"\n")
            ids.append(rid)
            texts.append(text)
            if len(buf) >= 20_000:
                fh.write(b"".join(buf))
                buf.clear()
        fh.write(b"".join(buf))
    return ids, texts, bad


def count_done(progress: str) -> int:
    try:
        return sum(1 for n in os.listdir(progress) if n.startswith("part-") and n.endswith(".done"))
    except FileNotFoundError:
        return 0


def total_chunks(progress: str) -> int | None:
    try:
        with open(os.path.join(progress, "plan.json"), "rb") as fh:
            return len(orjson.loads(fh.read())["chunks"])
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def parse_retries(stderr: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for line in stderr.splitlines():
        if line.startswith("Backend: "):
            for k, v in re.findall(r"(retry_\w+)=(\d+)", line):
                out[k] += int(v)
    return out


def check_output(work: str, ids: list[str], texts: list[str], bad: list[int], dim: int) -> dict[str, object]:
    """Exactly once, in order, bit-exact vectors; rejects at their lines; markers match shards."""
    from tweet_embed.testing.server import expected_vectors

    shards = sorted(glob.glob(os.path.join(work, "shards", "part-*.parquet")))
    got_ids: list[str] = []
    vecs = []
    for p in shards:
        t = pq.read_table(p)
        got_ids += t.column("id").to_pylist()
        vecs.append(np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1))
    got = np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)
    dupes = len(got_ids) - len(set(got_ids))
    missing = len(set(ids) - set(got_ids))
    in_order = got_ids == ids
    vectors_exact = bool(in_order and np.array_equal(got, expected_vectors(texts, dim)))
    with open(os.path.join(work, "progress", "rejects.jsonl"), "rb") as fh:
        rejects = [orjson.loads(x) for x in fh]
    rejects_ok = [r["line"] for r in rejects] == bad
    markers_ok = True
    for m in glob.glob(os.path.join(work, "progress", "part-*.done")):
        with open(m, "rb") as fh:
            marker = orjson.loads(fh.read())
        if file_sha256(os.path.join(work, "shards", marker["shard"])) != marker["sha256"]:
            markers_ok = False
    return {
        "rows_written": len(got_ids),
        "valid_input_rows": len(ids),
        "duplicates": dupes,
        "missing": missing,
        "in_input_order": in_order,
        "vectors_bit_exact": vectors_exact,
        "rejects": len(rejects),
        "rejects_at_expected_lines": rejects_ok,
        "markers_match_shards": markers_ok,
        "shards": len(shards),
        "exactly_once": bool(dupes == 0 and missing == 0 and len(got_ids) == len(ids)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--request-timeout", type=float, default=5.0)
    ap.add_argument("--no-events", action="store_true", help="no restarts, deaths or kills: faults only")
    ap.add_argument("--work", help="work directory (default: a temporary one, removed afterwards)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak.json"))
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="tweet-embed-soak-")
    os.makedirs(work, exist_ok=True)
    t_gen = time.monotonic()
    input_path = os.path.join(work, "tweets.jsonl")
    ids, texts, bad = write_input(input_path, args.lines, args.seed)
    gen_s = time.monotonic() - t_gen
    print(f"wrote {len(ids) + len(bad)} lines ({len(bad)} bad) in {gen_s:.1f}s", file=sys.stderr)

    servers = [
        TEIServer.spawn_process(
            dim=args.dim, max_client_batch_size=32, seed=args.seed * 100 + i, track_texts=False, **FAULTS
        )
        for i in range(args.servers)
    ]
    urls = ",".join(s.embed_url for s in servers)
    progress = os.path.join(work, "w", "progress")
    cmd = [
        sys.executable,
        "-m",
        "tweet_embed",
        "embed",
        input_path,
        "--tei-urls",
        urls,
        "--work-dir",
        os.path.join(work, "w"),
        "--chunk-size",
        str(args.chunk_size),
        "--request-timeout",
        str(args.request_timeout),
        "--max-retry-time",
        "300",
        "--log-interval",
        "30",
    ]
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    # (fraction of chunks done, action); each fires once
    events = (
        []
        if args.no_events
        else [
            (0.25, "restart server 1 (down 5 s)"),
            (0.35, "kill -9 pipeline"),
            (0.50, "server 2 dies for good"),
            (0.70, "kill -9 pipeline"),
        ]
    )
    fired: list[dict[str, object]] = []
    dead_counters: dict[int, dict[str, int]] = {}
    runs: list[dict[str, object]] = []
    retries: Counter[str] = Counter()
    t0 = time.monotonic()
    try:
        while True:
            log_path = os.path.join(work, f"run{len(runs)}.log")
            t_run = time.monotonic()
            with open(log_path, "w") as log_fh:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log_fh, stderr=subprocess.STDOUT)
                killed = False
                while proc.poll() is None:
                    time.sleep(0.25)
                    total = total_chunks(progress)
                    if not total or not events:
                        continue
                    frac = count_done(progress) / total
                    if frac < events[0][0]:
                        continue
                    at, what = events.pop(0)
                    fired.append({"at_fraction": at, "event": what, "t_s": round(time.monotonic() - t0, 1)})
                    print(f"[{time.monotonic() - t0:.0f}s] {what}", file=sys.stderr)
                    if what.startswith("restart"):
                        servers[1].set_faults(dead=True, revive_after=5.0)
                    elif what.startswith("server 2 dies"):
                        dead_counters[2] = servers[2].counters
                        servers[2].set_faults(dead=True)
                    else:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait()
                        killed = True
                        break
            with open(log_path) as fh:
                out = fh.read()
            rc = proc.returncode
            run = {"rc": rc, "killed": killed, "seconds": round(time.monotonic() - t_run, 1)}
            if not killed:
                r = parse_retries(out)
                retries.update(r)
                run["retries"] = dict(r)
            runs.append(run)
            print(f"run {len(runs)}: {run}", file=sys.stderr)
            if not killed:
                if rc != 0:
                    print(out[-4000:], file=sys.stderr)
                break
        total_s = time.monotonic() - t0
        injected: Counter[str] = Counter()
        per_server = []
        for i, s in enumerate(servers):
            c = dead_counters.get(i) or s.counters
            per_server.append(
                {
                    k: c[k]
                    for k in (
                        "requests",
                        "ok",
                        "429",
                        "503",
                        "dropped",
                        "hung",
                        "bad_count",
                        "bad_dim",
                        "nan",
                        "texts",
                    )
                }
            )
            for k in ("429", "503", "dropped", "hung", "bad_count", "bad_dim", "nan"):
                injected[k] += c[k]
    finally:
        for s in servers:
            s.stop()
    t_check = time.monotonic()
    checks = check_output(os.path.join(work, "w"), ids, texts, bad, args.dim) if runs[-1]["rc"] == 0 else {}
    check_s = time.monotonic() - t_check
    report = {
        "command": " ".join(["bench/soak.py"] + sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "lines": len(ids) + len(bad),
        "valid_rows": len(ids),
        "bad_lines": len(bad),
        "servers": args.servers,
        "dim": args.dim,
        "chunk_size": args.chunk_size,
        "faults_per_server": FAULTS,
        "events": fired,
        "runs": runs,
        "total_time_s": round(total_s, 1),
        "docs_per_s": round(len(ids) / total_s, 1),
        "input_generation_s": round(gen_s, 1),
        "check_s": round(check_s, 1),
        "client_retries_by_cause": dict(sorted(retries.items())),
        "server_injected_faults": dict(sorted(injected.items())),
        "per_server": per_server,
        "checks": checks,
    }
    ok = runs[-1]["rc"] == 0 and all(v for k, v in checks.items() if isinstance(v, bool))
    report["passed"] = ok
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
