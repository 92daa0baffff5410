"""Input throughput per format, on one core: the plan scan plus parsing every chunk, as ``embed`` reads them.

Why: the readers must keep ``embed`` from being input-bound. Each format holds the same records; the JSONL fast
path is the reference. Rounds are interleaved (every format once per round, the median kept) so a busy machine
slows all formats alike and the ratios survive the noise. Prints records/s per format and the ratio to JSONL,
and writes bench/results/input_bench.json.

    python bench/input_bench.py                 # 100,000 records, 3 rounds
    python bench/input_bench.py --records 20000 --rounds 1   # quick
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from tweet_embed.embed.chunks import iter_chunk_bytes, make_plan
from tweet_embed.embed.worker import ChunkOptions, read_block
from tweet_embed.input.rules import Rules
from tweet_embed.testing.synth import synth_tweets


def v1_tweet(i: int, text: str, rng: random.Random) -> dict:
    """A v1.1 tweet with the fields a stream or REST dump holds (user, entities, counts), made up."""
    tid = 1_600_000_000_000_000_000 + i
    user = {
        "id": 1000 + i % 5000,
        "id_str": str(1000 + i % 5000),
        "name": f"User {i % 5000}",
        "screen_name": f"user{i % 5000}",
        "location": "Somewhere",
        "description": "Bio text &amp; more about this account",
        "followers_count": rng.randint(0, 10_000),
        "friends_count": rng.randint(0, 2_000),
        "created_at": "Wed Oct 10 20:19:24 +0000 2018",
        "verified": False,
        "lang": None,
    }
    t = {
        "created_at": "Tue Mar 03 10:00:00 +0000 2020",
        "id": tid,
        "id_str": str(tid),
        "text": text,
        "truncated": False,
        "entities": {
            "hashtags": [{"text": "tag", "indices": [0, 4]}],
            "urls": [],
            "user_mentions": [{"screen_name": "someone", "id_str": "42", "indices": [5, 13]}],
        },
        "source": '<a href="https://example.com" rel="nofollow">client</a>',
        "user": user,
        "retweet_count": rng.randint(0, 50),
        "favorite_count": rng.randint(0, 100),
        "lang": "en",
    }
    if i % 4 == 0:  # a retweet: the original nested whole
        t["retweeted_status"] = {**t, "id_str": str(tid - 1), "user": {**user, "screen_name": "orig"}}
        t["text"] = "RT @orig: " + text[:100]
    return t


def write_all(d: str, n: int) -> dict[str, tuple[str, list[str]]]:
    """Every format's file with the same ``n`` records; values: (path, extra CLI-like field args)."""
    rng = random.Random(1)
    recs = [{"_id": i, "text": t} for i, t in synth_tweets(n, seed=1)]
    out: dict[str, tuple[str, list[str]]] = {}
    lines = b"".join(orjson.dumps(r) + b"\n" for r in recs)

    def put(name: str, data: bytes, fields: list[str] | None = None) -> None:
        p = os.path.join(d, name)
        with open(p, "wb") as fh:
            fh.write(data)
        out[name] = (p, fields or [])

    put("plain.jsonl", lines)
    put("plain.jsonl.gz", gzip.compress(lines, 6))
    put("plain.json", json.dumps(recs, indent=2, ensure_ascii=False).encode())
    put("plain-compact.json", orjson.dumps(recs))
    s = io.StringIO(newline="")
    w = csv.writer(s)
    w.writerow(["_id", "text"])
    w.writerows((r["_id"], r["text"]) for r in recs)
    put("plain.csv", s.getvalue().encode())
    s = io.StringIO(newline="")
    w = csv.writer(s, delimiter="\t")
    w.writerow(["_id", "text"])
    w.writerows((r["_id"], r["text"]) for r in recs)
    put("plain.tsv", s.getvalue().encode())
    p = os.path.join(d, "plain.parquet")
    pq.write_table(pa.table({"_id": [r["_id"] for r in recs], "text": [r["text"] for r in recs]}), p)
    out["plain.parquet"] = (p, [])
    tweets = [v1_tweet(k, r["text"], rng) for k, r in enumerate(recs)]
    v1 = b"".join(orjson.dumps(t) + b"\n" for t in tweets)
    put("v1.jsonl", v1)
    put("v1.json", orjson.dumps(tweets))
    v2 = [
        {
            "id": t["id_str"],
            "text": t["text"],
            "author_id": t["user"]["id_str"],
            "edit_history_tweet_ids": [t["id_str"]],
            "created_at": "2020-03-03T10:00:00.000Z",
            "lang": "en",
            "public_metrics": {"retweet_count": 1, "reply_count": 0, "like_count": 3, "quote_count": 0},
            "conversation_id": t["id_str"],
        }
        for t in tweets
    ]
    resp = []
    for k in range(0, n, 100):
        page = v2[k : k + 100]
        users = [{"id": x["author_id"], "username": f"user{x['author_id']}", "name": "User"} for x in page]
        resp.append(
            orjson.dumps({"data": page, "includes": {"users": users}, "meta": {"result_count": len(page)}})
        )
    put("twarc2.jsonl", b"\n".join(resp) + b"\n")
    return out


def measure(path: str, copts: ChunkOptions, chunk: int, plain: bool = False) -> tuple[int, float, float]:
    """(records, scan seconds, parse seconds) for one file, read as the run loop reads it; ``plain``: as
    plain records (no tweet text rules), i.e. what the JSONL fast path costs on the same bytes."""
    t0 = time.perf_counter()
    plan = make_plan([path], chunk)
    t1 = time.perf_counter()
    rows = 0
    f = plan.files[0]
    if plain:
        f.tweets = False
    if f.kind == "parquet":
        for c in plan.chunks:
            rows += len(read_block(f, c, copts).ids)
    else:
        for c, data in iter_chunk_bytes(plan, plan.chunks):
            b = read_block(f, c, copts, data)
            rows += len(b.ids) + sum(b.skipped.values())
    return rows, t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "input_bench.json"))
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    cases: list[tuple[str, str, ChunkOptions, bool]] = []
    with tempfile.TemporaryDirectory() as d:
        files = write_all(d, args.records)
        plain = ChunkOptions()
        for name in files:
            cases.append((name, name, plain, False))
        cases.append(
            ("plain.jsonl --lang en", "plain.jsonl", ChunkOptions(rules=Rules(langs=("en",))), False)
        )
        # the same v1.1 objects through the JSONL fast path (id_str, the raw text field: no text rules)
        cases.append(("v1.jsonl as plain records", "v1.jsonl", ChunkOptions(id_field="id_str"), True))
        times: dict[str, list[float]] = {c[0]: [] for c in cases}
        scans: dict[str, list[float]] = {c[0]: [] for c in cases}
        rows_of: dict[str, int] = {}
        for _ in range(args.rounds):
            for label, name, copts, as_plain in cases:
                rows, scan, parse = measure(files[name][0], copts, args.chunk_size, as_plain)
                rows_of[label] = rows
                times[label].append(scan + parse)
                scans[label].append(scan)
        sizes = {name: os.path.getsize(p) for name, (p, _) in files.items()}
    ref = args.records / statistics.median(times["plain.jsonl"])
    result = []
    print(f"{args.records} records each, median of {args.rounds} interleaved rounds, one core")
    print(f"{'format':28} {'MB':>7} {'records/s':>11} {'MB/s':>6} {'scan share':>10} {'vs JSONL':>9}")
    for label, *_ in cases:
        med = statistics.median(times[label])
        rate = args.records / med
        share = statistics.median(scans[label]) / med
        mb = sizes[label.split()[0]] / 1e6
        print(f"{label:28} {mb:7.1f} {rate:11,.0f} {mb / med:6.1f} {share:10.0%} {ref / rate:8.2f}x")
        result.append(
            {
                "format": label,
                "mb": round(mb, 1),
                "records_per_s": round(rate),
                "mb_per_s": round(mb / med, 1),
                "scan_share": round(share, 3),
                "slower_than_jsonl": round(ref / rate, 2),
                "rows": rows_of[label],
            }
        )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(
            {
                "records": args.records,
                "rounds": args.rounds,
                "python": sys.version.split()[0],
                "results": result,
            },
            fh,
            indent=2,
        )


if __name__ == "__main__":
    main()
