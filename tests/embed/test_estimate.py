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


def test_exact_distinct_is_the_map_embed_then_reuses(tmp_path: Path) -> None:
    """Repeats far apart (a retweet hours after its tweet) are missed by the sample but not by the exact
    count, which is the dedupe map itself: `embed` in the same work dir loads it instead of scanning again,
    and a map made with other input options (a filter) is planned again, never trusted."""
    import dataclasses
    import os

    from tweet_embed.embed.runner import run_embed
    from tweet_embed.input.rules import Rules

    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 12_000, seed=4, repeat_fraction=0.4)
    texts = [orjson.loads(x)["text"] for x in src.read_bytes().splitlines()]
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    opts = EmbedOptions(inputs=[str(src)], dirs=dirs, chunk_lines=200, log_interval=60)
    with TEIServer(dim=DIM) as srv:
        spec = BackendSpec(urls=(srv.embed_url,))
        sampled = asyncio.run(make_estimate(opts, spec, sample_lines=1000, calibrate=0, distinct="sample"))
        index = tmp_path / "w" / "progress" / "dedupe" / "index.json"
        assert not index.exists()  # the sample estimate builds no map
        exact = asyncio.run(make_estimate(opts, spec, sample_lines=1000, calibrate=0))  # auto: exact here
        assert exact["distinct_method"] == "exact" and sampled["distinct_method"] == "sample"
        assert exact["distinct_texts"] == len(set(texts)) < sampled["distinct_texts"]  # sample: upper bound
        assert exact["valid_rows"] == 12_000 and exact["texts_to_send"] == len(set(texts))
        assert "whole input" in format_table(exact)
        built = index.stat().st_mtime_ns
        summary = run_embed(dataclasses.replace(opts, max_chunks=3), spec)
        assert index.stat().st_mtime_ns == built  # embed loaded the plan's map
        assert summary.distinct_texts == exact["distinct_texts"]
        # Other input options: other texts, so the map is made again for them.
        long_only = EmbedOptions(
            inputs=[str(src)], dirs=WorkDirs.from_options(str(tmp_path / "w"), None, None, None),
            chunk_lines=200, rules=Rules(min_chars=60),
        )  # fmt: skip
        again = asyncio.run(make_estimate(long_only, spec, sample_lines=1000, calibrate=0))
        assert os.stat(index).st_mtime_ns != built
        kept = [t for t in texts if len(t.strip()) >= 60]
        assert again["distinct_texts"] == len(set(kept)) and again["valid_rows"] == len(kept)


def test_token_lengths_from_the_in_process_model(tmp_path: Path) -> None:
    """The local model's own tokenizer gives the token figures, untruncated, against its maximum length."""
    from tokenizers import Tokenizer

    from tweet_embed.backends.local import minilm_dir

    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 300, seed=5)
    with src.open("a") as f:  # one text far over MiniLM's 256 tokens
        f.write(json.dumps({"_id": "long", "text": "storm " * 400}) + "\n")
    texts = [orjson.loads(x)["text"] for x in src.read_bytes().splitlines()]
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    spec = BackendSpec(device="cpu", runtime="torch")  # the packaged all-MiniLM-L6-v2
    r = asyncio.run(make_estimate(EmbedOptions(inputs=[str(src)], dirs=dirs), spec, calibrate=0))
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()  # the file pads to 128
    counts = sorted(len(e.ids) for e in tok.encode_batch(texts))
    t = r["tokens"]
    assert t["max_input_length"] == 256 and t["max"] == counts[-1] > 256
    assert t["p50"] == counts[len(counts) // 2] and t["truncated_share"] == round(1 / len(texts), 4)
