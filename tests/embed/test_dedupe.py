"""Each distinct text embedded once per run and across runs (--reuse), through the real CLI and test server.

The test server counts every text it is sent, so "sent once" is what the server saw, not what we claim.
"""

from __future__ import annotations

import gzip
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
from xxhash import xxh3_128_digest

from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets

from conftest import ROOT, alive, descendants, read_shards, run_cli

DIM = 8
PROBE = "dimension probe"


def write_jsonl(path, records, gz: bool = False, bad_at: int | None = None) -> None:
    lines = [orjson.dumps({"_id": i, "text": t}) for i, t in records]
    if bad_at is not None:
        lines.insert(bad_at, b'{"_id": "bad", "text": null}')
    data = b"\n".join(lines) + b"\n"
    with open(path, "wb") as fh:
        fh.write(gzip.compress(data) if gz else data)


def corpus(n: int, seed: int, prefix: str = "") -> list[tuple[str, str]]:
    """Tweets where about half the rows repeat an earlier text (retweets), spread over the file."""
    return [(prefix + i, t) for i, t in synth_tweets(n, seed=seed, repeat_fraction=0.5)]


def sent(server: TEIServer) -> Counter[str]:
    c = Counter(server.embedded)
    del c[PROBE]
    return c


def assert_exact(shards: str, records: list[tuple[str, str]]) -> None:
    """Every valid record once, in input order, with its own text's vector (bit for bit) and text hash."""
    ids, vecs, _ = read_shards(shards, DIM)
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))
    hashes = pq.read_table(shards, columns=["text_hash"]).column(0).to_pylist()
    assert hashes == [xxh3_128_digest(t.encode("utf-8")) for _, t in records]


def embed(path, server: TEIServer, work, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [*map(str, path)] if isinstance(path, list) else [str(path)]
    return run_cli("embed", *args, "--tei-urls", server.embed_url, "--work-dir", str(work), *extra)


def test_repeats_across_chunks_and_files_are_sent_once_and_output_is_exact(tmp_path) -> None:
    a, b = corpus(700, seed=11), corpus(300, seed=11, prefix="gz")[:300]  # b repeats a's texts (same seed)
    write_jsonl(tmp_path / "a.jsonl", a, bad_at=5)
    write_jsonl(tmp_path / "b.jsonl.gz", b, gz=True)
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]
    records = a + b
    distinct = {t for _, t in records}
    assert len(distinct) < 0.6 * len(records)
    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        r = embed(inputs, srv, tmp_path / "w", "--chunk-size", "40")
        assert r.returncode == 0, r.stderr
        assert sent(srv) == Counter(distinct)  # each distinct text once, across 26 chunks and two files
        srv.reset_counters()
        r2 = embed(inputs, srv, tmp_path / "plain", "--chunk-size", "40", "--no-dedupe")
        assert r2.returncode == 0, r2.stderr
        assert sent(srv) == Counter(t for _, t in records)  # --no-dedupe: every row, as before
    assert (
        f"Texts: {len(records)} rows in the run, {len(distinct)} distinct; sent now: {len(distinct)}"
        in r.stderr
    )
    assert_exact(str(tmp_path / "w" / "shards"), records)
    # the same shards, byte for byte in content, with or without dedupe
    for name in sorted(os.listdir(tmp_path / "w" / "shards")):
        t1 = pq.read_table(tmp_path / "w" / "shards" / name)
        t2 = pq.read_table(tmp_path / "plain" / "shards" / name)
        assert t1.equals(t2)
    manifest = json.loads((tmp_path / "w" / "progress" / "manifest.json").read_text())
    assert manifest["options"]["dedupe"] is True
    assert manifest["texts"] == {
        "rows_planned": len(records),
        "distinct_texts": len(distinct),
        "chunks_done": 26,
        "chunks": 26,
        "rows_written": len(records),
        "texts_sent": len(distinct),
        "vectors_reused": 0,
    }
    st = run_cli("status", "--work-dir", str(tmp_path / "w"))
    assert f"texts: {len(records)} rows, {len(distinct)} distinct; sent: {len(distinct)}" in st.stdout
    v = run_cli("verify", *map(str, inputs), "--work-dir", str(tmp_path / "w"))
    assert v.returncode == 0, v.stdout + v.stderr
    # a resume may not switch dedupe off: the vectors of repeats would be made another way
    with TEIServer(dim=DIM) as srv:
        assert embed(inputs, srv, tmp_path / "p", "--chunk-size", "40", "--max-chunks", "2").returncode == 0
        r3 = embed(inputs, srv, tmp_path / "p", "--chunk-size", "40", "--no-dedupe")
    assert r3.returncode != 0 and "'dedupe': False" in r3.stderr and "'dedupe': True" in r3.stderr, r3.stderr


def test_reuse_of_shards_or_consolidated_dir_sends_only_new_texts(tmp_path) -> None:
    day1 = corpus(400, seed=21)
    new = [(f"new{i}", f"a fresh tweet number {i % 25}") for i in range(40)]  # 25 new texts, repeated
    day2 = day1 + new
    write_jsonl(tmp_path / "day1.jsonl", day1)
    write_jsonl(tmp_path / "day2.jsonl", day2)
    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        assert embed(tmp_path / "day1.jsonl", srv, tmp_path / "d1", "--chunk-size", "100").returncode == 0
        c = run_cli("consolidate", "--work-dir", str(tmp_path / "d1"))
        assert c.returncode == 0, c.stderr
        assert pq.read_schema(tmp_path / "d1" / "consolidated" / "embeddings-00000.parquet").names == [
            "id",
            "embedding",
            "text_hash",
        ]
        for name, source in (("s", tmp_path / "d1" / "shards"), ("c", tmp_path / "d1" / "consolidated")):
            srv.reset_counters()
            r = embed(
                tmp_path / "day2.jsonl",
                srv,
                tmp_path / f"d2{name}",
                "--chunk-size",
                "100",
                "--reuse",
                str(source),
            )
            assert r.returncode == 0, r.stderr
            assert sent(srv) == Counter({t for _, t in new})  # only the 25 new texts
            assert "reused from earlier runs: 400" in r.stderr
            assert_exact(str(tmp_path / f"d2{name}" / "shards"), day2)  # complete on its own
            v = run_cli("verify", str(tmp_path / "day2.jsonl"), "--work-dir", str(tmp_path / f"d2{name}"))
            assert v.returncode == 0, v.stdout + v.stderr


def test_reuse_of_another_dimension_is_refused_naming_both(tmp_path) -> None:
    day1 = corpus(100, seed=31)
    write_jsonl(tmp_path / "day1.jsonl", day1)
    with TEIServer(dim=DIM) as srv:
        assert embed(tmp_path / "day1.jsonl", srv, tmp_path / "d1").returncode == 0
    with TEIServer(dim=16) as other:
        r = embed(tmp_path / "day1.jsonl", other, tmp_path / "d2", "--reuse", str(tmp_path / "d1" / "shards"))
        assert sent(other) == Counter()
    assert r.returncode != 0
    assert "dim: '8' there, '16' in this run" in r.stderr, r.stderr
    assert not [n for n in os.listdir(tmp_path / "d2" / "shards") if n.endswith(".parquet")]


def test_kill9_with_repeats_across_chunks_gives_the_uninterrupted_output(tmp_path) -> None:
    """Kills land while chunks wait for, publish and read shared vectors (half of them a few ms after a chunk
    finished); after a final resume the shards are the uninterrupted run's, bit for bit."""
    records = corpus(1200, seed=41)
    path = tmp_path / "in.jsonl"
    write_jsonl(path, records)
    common = ["--chunk-size", "30", "--batch-size", "8", "--workers", "1", "--chunks-in-flight", "3"]
    with TEIServer(dim=DIM, max_client_batch_size=8) as fast:
        assert embed(path, fast, tmp_path / "ref", *common).returncode == 0
    work = tmp_path / "w"
    rng = random.Random(7)

    def done() -> int:
        d = work / "progress"
        return len([n for n in os.listdir(d) if n.endswith(".done")]) if d.exists() else 0

    mid_work = 0
    # Slow enough (0.1 s a batch) that the eight kills cannot finish all 40 chunks even on a fast, quiet box.
    with TEIServer(dim=DIM, max_client_batch_size=8, latency=0.1) as srv:
        args = [sys.executable, "-m", "tweet_embed", "embed", str(path), "--tei-urls", srv.embed_url]
        args += ["--work-dir", str(work), *common]
        for i in range(8):
            before = done()
            p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if i % 2:
                time.sleep(rng.uniform(0.0, 0.6))  # start-up, planning, the first chunks
            else:
                deadline = time.monotonic() + 60
                while (
                    done() < before + rng.randint(1, 3) and p.poll() is None and time.monotonic() < deadline
                ):
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.05))
            kids = descendants(p.pid)
            p.send_signal(signal.SIGKILL)
            p.wait()
            mid_work += done() > before and p.returncode == -signal.SIGKILL
            deadline = time.monotonic() + 30
            while any(alive(k) for k in kids) and time.monotonic() < deadline:
                time.sleep(0.05)
        assert mid_work >= 3 and done() < 40, (mid_work, done())
        r = embed(path, srv, work, *common)
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(work / "shards"))
    assert names == sorted(os.listdir(tmp_path / "ref" / "shards")) and len(names) == 40
    for n in names:
        assert pq.read_table(work / "shards" / n).equals(pq.read_table(tmp_path / "ref" / "shards" / n))
    assert_exact(str(work / "shards"), records)


@pytest.mark.parametrize("lines", [0, 1])
def test_tiny_inputs(tmp_path, lines: int) -> None:
    write_jsonl(tmp_path / "in.jsonl", [("1", "only")][:lines])
    with TEIServer(dim=DIM) as srv:
        r = embed(tmp_path / "in.jsonl", srv, tmp_path / "w")
    assert r.returncode == 0, r.stderr


def test_a_lost_first_chunk_is_not_waited_for_and_the_first_publisher_wins(tmp_path, monkeypatch) -> None:
    """Chunk 1 repeats a text of chunk 0, which never runs (a lost actor, a task not started): after its
    patience chunk 1 embeds and publishes the text itself; chunk 0 then takes the published vector instead of
    sending the text again, so both shards hold the same bytes."""
    import asyncio

    from tweet_embed.embed import worker
    from tweet_embed.embed.chunks import make_plan
    from tweet_embed.embed.dedupe import SLOT_OK, SlotStore
    from tweet_embed.embed.dedupe_plan import plan_dedupe

    from conftest import CountingBackend, text_vector

    write_jsonl(tmp_path / "in.jsonl", [("1", "a"), ("2", "b"), ("3", "a"), ("4", "c")])
    plan = make_plan([str(tmp_path / "in.jsonl")], chunk_lines=2)
    files, index = plan_dedupe(plan, str(tmp_path / "dedupe"))
    assert index["distinct_texts"] == 3 and files.slots == 1
    copts = worker.ChunkOptions(dedupe=files)
    be = CountingBackend(dim=4)
    monkeypatch.setattr(worker, "PATIENCE", 0.05)

    async def run(i: int) -> worker.ChunkResult:
        info = await be.start()
        block = worker.read_block(plan.files[0], plan.chunks[i], copts)
        return await worker.embed_chunk(be, plan.chunks[i], block, info, copts)

    late = asyncio.run(run(1))
    assert late.embedded_texts == 2 and be.texts == Counter({"a": 1, "c": 1})
    first = asyncio.run(run(0))
    assert first.embedded_texts == 1 and be.texts == Counter({"a": 1, "b": 1, "c": 1})
    np.testing.assert_array_equal(first.vectors[0], late.vectors[0])
    np.testing.assert_array_equal(first.vectors, np.stack([text_vector(t, 4) for t in "ab"]))
    store = SlotStore(files, 4)
    try:  # a second publisher gets the first one's vector back, and the slot keeps it
        got, flags = store.publish(np.array([0]), np.ones((1, 4), np.float32), np.array([SLOT_OK], np.uint8))
        np.testing.assert_array_equal(got[0], text_vector("a", 4))
        np.testing.assert_array_equal(store.read(np.array([0]))[0], text_vector("a", 4))
    finally:
        store.close()
