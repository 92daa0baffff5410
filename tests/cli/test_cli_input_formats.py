"""Integration: the real CLI on every input format (JSON array, CSV/TSV, twarc2, Twitter objects), against the
real local TEI-compatible server: exact output, kill -9 and resume, filters counted, and a clear error before
any work for a file that is not what it claims."""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import zstandard

from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets

from conftest import ROOT, read_shards, run_cli

DIM = 16


def assert_exact(shards: str, records: list[tuple[str, str]]) -> None:
    """Every id exactly once, in input order, with the vector of its own text."""
    ids, vecs, _ = read_shards(shards, DIM)
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))


def write_array(path: str, records: list[tuple[str, str]], indent: int | None = 2) -> None:
    data = json.dumps([{"_id": i, "text": t} for i, t in records], indent=indent, ensure_ascii=False).encode()
    with gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb") as fh:
        fh.write(data)


def write_csv(path: str, records: list[tuple[str, str]], delimiter: str = ",") -> None:
    out = io.StringIO(newline="")
    w = csv.writer(out, delimiter=delimiter)
    w.writerow(["tweet_id", "body"])
    w.writerows(records)
    data = out.getvalue().encode()
    if path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as fh:
        fh.write(data)


@pytest.fixture
def server():
    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        yield srv


def test_every_format_in_one_run_exactly_once(tmp_path, server) -> None:
    """A JSON array (.gz), CSV with quoted newlines, TSV (.zst), v1.1 tweets, and twarc2 responses, in one run:
    each record once, in input order, with the text a reader sees."""
    recs = list(synth_tweets(120, seed=5))
    recs = [(i, t + ("\nsecond line" if k % 7 == 0 else "")) for k, (i, t) in enumerate(recs)]
    array, csvf, tsv = recs[:40], recs[40:70], recs[70:100]
    write_array(str(tmp_path / "a.json.gz"), array)
    write_csv(str(tmp_path / "b.csv"), csvf)
    write_csv(str(tmp_path / "c.tsv.zst"), tsv, "\t")
    v1 = [
        {
            "id": 1500 + k,
            "id_str": str(1500 + k),
            "text": "cut\u2026",
            "truncated": True,
            "extended_tweet": {"full_text": f"whole tweet {k} &amp; more"},
            "user": {"id_str": "1", "screen_name": "ann"},
        }
        for k in range(5)
    ]
    (tmp_path / "d.jsonl").write_bytes(b"".join(orjson.dumps(t) + b"\n" for t in v1))
    line = {
        "data": [
            {"id": "9001", "text": "a &lt;3", "author_id": "2", "edit_history_tweet_ids": ["9001"]},
            {
                "id": "9002",
                "text": "RT @bo: cut\u2026",
                "author_id": "2",
                "referenced_tweets": [{"type": "retweeted", "id": "8000"}],
            },
        ],
        "includes": {
            "tweets": [
                {
                    "id": "8000",
                    "text": "cut\u2026",
                    "note_tweet": {"text": "the whole note"},
                    "author_id": "3",
                }
            ],
            "users": [{"id": "3", "username": "bo"}],
        },
        "meta": {"result_count": 2},
    }
    (tmp_path / "e.jsonl").write_bytes(orjson.dumps(line) + b"\n")
    inputs = ["a.json.gz", "b.csv", "c.tsv.zst", "d.jsonl", "e.jsonl"]
    r = run_cli(
        "embed",
        *[str(tmp_path / n) for n in inputs],
        "--tei-urls",
        server.embed_url,
        "--work-dir",
        str(tmp_path / "w"),
        "--chunk-size",
        "7",
        "--id-field",
        "_id",
    )
    # CSV columns are tweet_id/body: the plan refuses before any work, naming the columns
    assert r.returncode == 1 and "no column '_id' (columns: tweet_id, body)" in r.stderr, r.stderr
    assert sum(server.embedded.values()) == 0
    # the same files with the right columns for the CSVs: one run per field naming (fields are per run)
    expected = (
        array
        + [(str(1500 + k), f"whole tweet {k} & more") for k in range(5)]
        + [("9001", "a <3"), ("9002", "RT @bo: the whole note")]
    )
    r = run_cli(
        "embed",
        *[str(tmp_path / n) for n in ("a.json.gz", "d.jsonl", "e.jsonl")],
        "--tei-urls",
        server.embed_url,
        "--work-dir",
        str(tmp_path / "w1"),
        "--chunk-size",
        "7",
    )
    assert r.returncode == 0, r.stderr
    assert f"Embedded {len(expected)} rows" in r.stderr and "Rejected: 0" in r.stderr
    assert_exact(str(tmp_path / "w1" / "shards"), expected)
    r = run_cli(
        "embed",
        str(tmp_path / "b.csv"),
        str(tmp_path / "c.tsv.zst"),
        "--tei-urls",
        server.embed_url,
        "--work-dir",
        str(tmp_path / "w2"),
        "--chunk-size",
        "7",
        "--id-field",
        "tweet_id",
        "--text-field",
        "body",
    )
    assert r.returncode == 0, r.stderr
    assert_exact(str(tmp_path / "w2" / "shards"), csvf + tsv)
    st = run_cli("status", "--work-dir", str(tmp_path / "w2"))
    assert "b.csv (30 rows)" in st.stdout and "complete" in st.stdout


def test_pretty_printed_array_of_the_bundled_sample(tmp_path, server) -> None:
    """The issue's case: json.dump(rows, f, indent=2) of the sample gave 202 rejects and 0 rows."""
    with open(os.path.join(ROOT, "sample", "tweets.jsonl"), "rb") as fh:
        rows = [orjson.loads(x) for x in fh.read().splitlines()[:300]]
    (tmp_path / "sample.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    r = run_cli(
        "embed",
        str(tmp_path / "sample.json"),
        "--tei-urls",
        server.embed_url,
        "--work-dir",
        str(tmp_path / "w"),
    )
    assert r.returncode == 0, r.stderr
    assert "Embedded 300 rows" in r.stderr and "Rejected: 0" in r.stderr
    assert_exact(str(tmp_path / "w" / "shards"), [(x["_id"], x["text"]) for x in rows])


def test_a_file_that_is_not_what_format_claims_fails_before_any_work(tmp_path, server) -> None:
    write_array(str(tmp_path / "a.json"), list(synth_tweets(20)))
    r = run_cli(
        "embed",
        str(tmp_path / "a.json"),
        "--format",
        "jsonl",
        "--tei-urls",
        server.embed_url,
        "--work-dir",
        str(tmp_path / "w"),
    )
    assert r.returncode == 1
    assert "looks like a JSON array, not JSON Lines: use --format json" in r.stderr
    assert sum(server.embedded.values()) == 0
    assert not os.path.exists(tmp_path / "w" / "progress" / "plan.json")
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(256)) * 100)
    r = run_cli(
        "embed",
        str(tmp_path / "bin.jsonl"),
        "--tei-urls",
        server.embed_url,
        "--work-dir",
        str(tmp_path / "w"),
    )
    assert r.returncode == 1 and "is a binary file" in r.stderr
    assert sum(server.embedded.values()) == 0


def test_filters_are_counted_in_summary_and_status_and_survive_resume(tmp_path, server) -> None:
    tweets = []
    for k in range(60):
        t = {"id": str(100 + k), "text": f"post number {k} about bread", "author_id": "1", "lang": "en"}
        t["edit_history_tweet_ids"] = [t["id"]]
        if k % 3 == 0:
            t["lang"] = "fr"
        elif k % 5 == 0:
            t["referenced_tweets"] = [{"type": "retweeted", "id": "1"}]
            t["text"] = "RT @x: " + t["text"]
        elif k % 7 == 0:
            t["text"] = "ok"
        tweets.append(t)
    path = tmp_path / "v2.json"
    path.write_bytes(orjson.dumps(tweets))
    kept = [
        (t["id"], t["text"])
        for t in tweets
        if t["lang"] == "en" and "referenced_tweets" not in t and len(t["text"]) >= 5
    ]
    skipped = Counter(
        "lang" if t["lang"] != "en" else "retweet" if "referenced_tweets" in t else "short"
        for t in tweets
        if (t["id"], t["text"]) not in kept
    )
    args = [
        "embed",
        str(path),
        "--tei-urls",
        server.embed_url,
        "--work-dir",
        str(tmp_path / "w"),
        "--chunk-size",
        "10",
        "--lang",
        "en",
        "--skip-retweets",
        "--text-mode",
        "raw",
        "--min-text-length",
        "5",
    ]
    r = run_cli(*args, "--max-chunks", "2")
    assert r.returncode == 0, r.stderr
    # another filter is another run: refused, not mixed into this one
    r = run_cli(*args[:-1], "6")
    assert r.returncode == 1 and "min_text_length" in r.stderr, r.stderr
    r = run_cli(*args)  # the resume: the summary still counts the first two chunks' skips
    assert r.returncode == 0, r.stderr
    assert_exact(str(tmp_path / "w" / "shards"), kept)
    text = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
    assert f"Skipped by filters: {sum(skipped.values())} rows ({text})" in r.stderr
    assert "Rejected: 0" in r.stderr
    st = run_cli("status", "--work-dir", str(tmp_path / "w"))
    assert f"skipped by filters: {sum(skipped.values())} ({text})" in st.stdout
    assert "v2.json (60 records)" in st.stdout
    from tweet_embed.parquet import read_metadata

    shards = glob.glob(str(tmp_path / "w" / "shards" / "*.parquet"))
    assert shards and all(read_metadata(p).get("text_mode") == "raw" for p in shards)
    # verify reads the input with the same filters: the filtered rows are not missing; without them they are
    filters = args[args.index("--lang") :]
    v = run_cli("verify", str(path), "--work-dir", str(tmp_path / "w"), *filters)
    assert v.returncode == 0, v.stdout + v.stderr
    v = run_cli("verify", str(path), "--work-dir", str(tmp_path / "w"))
    assert v.returncode == 1 and str(sum(skipped.values())) in v.stdout, v.stdout


@pytest.mark.parametrize("kind", ["json.gz", "csv"])
def test_kill9_at_random_moments_then_resume_is_exact(tmp_path, server, kind) -> None:
    records = list(synth_tweets(1500, seed=8))
    records = [(i, t + ('\n, "quoted" line' if k % 5 == 0 else "")) for k, (i, t) in enumerate(records)]
    path = str(tmp_path / f"in.{kind}")
    if kind == "csv":
        write_csv(path, records)
        fields = ["--id-field", "tweet_id", "--text-field", "body"]
    else:
        write_array(path, records)
        fields = []
    server.set_faults(latency=0.05)
    work = str(tmp_path / "w")
    args = [sys.executable, "-m", "tweet_embed", "embed", path, "--tei-urls", server.embed_url]
    args += ["--work-dir", work, "--chunk-size", "100", *fields]
    rng = random.Random(12)
    markers = os.path.join(work, "progress", "part-*.done")
    interrupted = 0
    for target in (1, 4, 7, 10):  # kill once this many chunks are done, a random moment later
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while len(glob.glob(markers)) < target and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))
        interrupted += p.poll() is None
        p.send_signal(signal.SIGKILL)
        p.wait()
        for f in glob.glob(os.path.join(work, "shards", "*.parquet")):
            pq.read_metadata(f)  # every published shard is complete
    assert interrupted >= 3  # the kills cut runs short, mid-file
    r = run_cli(*args[3:])
    assert r.returncode == 0, r.stderr
    assert_exact(os.path.join(work, "shards"), records)
    assert not [n for n in os.listdir(os.path.join(work, "shards")) if n.startswith(".")]
