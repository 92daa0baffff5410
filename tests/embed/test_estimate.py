"""``tweet-embed plan``: figures checked against what the real run then does (real CLI, capacity-mode test
servers).  The ±15% accuracy over a 2-minute run is bench/plan_accuracy.py's; here a ~8 s run, ±30%."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import orjson

from tweet_embed.backends import BackendSpec
from tweet_embed.embed.chunks import Chunk, Plan, WorkDirs
from tweet_embed.embed.estimate import format_table, make_estimate, sample_chunks
from tweet_embed.embed.options import EmbedOptions
from tweet_embed.testing.server import TEIServer, approx_tokens
from tweet_embed.testing.synth import write_jsonl

from conftest import run_cli

DIM = 32


def test_sample_chunks_spread_over_the_whole_input() -> None:
    chunks = [Chunk(0, i, i * 1000 + 1, 1000, i * 10, i * 10 + 10) for i in range(100)]
    plan = Plan(files=[], chunks=chunks, chunk_lines=1000)  # type: ignore[call-arg]
    picks = sample_chunks(plan, 10_000)
    idx = [c.index for c in picks]
    assert len(idx) == 20 and idx[0] == 0 and idx[-1] == 99  # first, last, and evenly between
    gaps = {b - a for a, b in zip(idx, idx[1:], strict=False)}
    assert gaps <= {5, 6}
    assert len(sample_chunks(plan, 50_000)) == 50  # more lines asked: more chunks
    few = Plan(files=[], chunks=chunks[:3], chunk_lines=1000)  # type: ignore[call-arg]
    assert [c.index for c in sample_chunks(few, 10_000)] == [0, 1, 2]


def test_plan_then_embed(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 6000, seed=9, repeat_fraction=0.3)
    with src.open("ab") as f:
        f.write(b"{broken\n")
        f.write(b'{"_id": "e1", "text": ""}\n{"_id": "e2", "text": ""}\n')
    texts = [orjson.loads(x)["text"] for x in src.read_bytes().splitlines()[:6000]]
    work = tmp_path / "w"
    with (
        TEIServer(dim=DIM, capacity=400, max_client_batch_size=32) as a,
        TEIServer(dim=DIM, capacity=400, max_client_batch_size=32) as b,
    ):
        urls = f"{a.embed_url},{b.embed_url}"
        args = ["--tei-urls", urls, "--work-dir", str(work), "--chunk-size", "1000"]
        plan = run_cli("plan", str(src), *args, "--calibrate", "2", "--json")
        assert plan.returncode == 0, plan.stderr
        r = json.loads(plan.stdout)
        plan_json = work / "progress" / "plan.json"
        mtime = plan_json.stat().st_mtime_ns
        run = run_cli("embed", str(src), *args)
        assert run.returncode == 0, run.stderr
    assert plan_json.stat().st_mtime_ns == mtime  # embed reused the plan's scan
    # Every chunk was sampled here (7 < 20), so the counts are exact.
    assert (r["lines"], r["chunks"], r["valid_rows"]) == (6003, 7, 6000)
    assert r["rejects"] == {"malformed JSON": 1, "text is empty": 2}
    assert r["distinct_texts"] == len(set(texts)) < 6000
    counts = sorted(approx_tokens(t) for t in texts)
    assert r["tokens"]["max"] == counts[-1] and r["tokens"]["max_input_length"] == 512
    assert abs(r["tokens"]["p50"] - counts[len(counts) // 2]) <= 1
    assert r["dim"] == DIM and r["bigquery_bytes"] > 6000 * 8 * DIM == r["vector_search_scan_bytes"]
    shards = sum(p.stat().st_size for p in (work / "shards").glob("*.parquet"))
    assert abs(r["shard_bytes"] / shards - 1) < 0.15, (r["shard_bytes"], shards)
    cal = r["calibration"]
    assert set(cal["per_endpoint"]) == {a.url.split("//")[1], b.url.split("//")[1]}
    assert 600 <= cal["docs_per_s"] <= 880  # two servers of 400 docs/s
    m = re.search(r"Embedded 6000 rows .* in ([0-9.]+)s", run.stderr)
    assert m, run.stderr
    assert abs(r["estimated_seconds"] / float(m.group(1)) - 1) <= 0.30, (r["estimated_seconds"], m.group(1))


def test_plan_table_and_no_calibration(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 500, seed=1)
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    with TEIServer(dim=DIM) as srv:
        r = asyncio.run(
            make_estimate(
                EmbedOptions(inputs=[str(src)], dirs=dirs), BackendSpec(urls=(srv.embed_url,)), calibrate=0
            )
        )
        sent = srv.counters["texts"]
    table = format_table(r)
    assert re.search(r"^lines\s+500$", table, re.M) and "not measured (--calibrate 0)" in table
    assert "VECTOR_SEARCH" in table and "bigquery_bytes" in table
    assert sent == 1  # only the start-up probe: nothing embedded without --calibrate
    assert re.search(r"^tokens\s+p50 \d+, p95 \d+, max \d+; over 512: 0.00%$", table, re.M)
    assert r["estimated_seconds"] is None and (tmp_path / "w" / "progress" / "estimate.json").exists()
