"""Integration: the real CLI (subprocess) against the real local TEI-compatible server, on real files."""

from __future__ import annotations

import glob
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets, write_jsonl

from conftest import CLI, ROOT, alive, descendants, read_shards, run_cli, sample_slice

DIM = 16


def read_output(shards: str) -> tuple[list[str], np.ndarray]:
    ids, vecs, _ = read_shards(shards, DIM)  # raises on an unreadable shard
    return ids, vecs


def assert_exact(shards: str, records: list[tuple[str, str]]) -> None:
    """Every id exactly once, in input order, with the vector of its own text."""
    ids, vecs = read_output(shards)
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))


@pytest.fixture
def server():
    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        yield srv


@pytest.fixture
def corpus(tmp_path):
    path = str(tmp_path / "tweets.jsonl")
    write_jsonl(path, 3000, seed=3)
    return path, list(synth_tweets(3000, seed=3))


def test_seed_command_line_verbatim(tmp_path, server, corpus) -> None:
    """``python embed_tweets.py --input-file FILE --tei-urls URL`` with the original default layout."""
    path, records = corpus
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "embed_tweets.py"),
            "--input-file",
            path,
            "--tei-urls",
            server.embed_url,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "Embedded 3000 rows" in r.stderr
    for d in ("tmp", "progress", "shards"):
        assert os.path.isdir(tmp_path / "embeddings" / d)
    assert_exact(str(tmp_path / "embeddings" / "shards"), records)
    from collections import Counter

    expected = Counter({t: 1 for _, t in records})  # each distinct text once, repeats included
    expected["dimension probe"] += 1
    assert server.embedded == expected  # nothing sent twice
    st = run_cli("status", cwd=str(tmp_path))
    assert st.returncode == 0 and "chunks: 1 / 1 done" in st.stdout and "complete" in st.stdout


def test_progress_line_format(tmp_path, corpus) -> None:
    path, records = corpus
    with TEIServer(dim=DIM, latency=0.05) as srv:
        r = run_cli(
            "embed",
            path,
            "--tei-urls",
            srv.url,
            "--work-dir",
            str(tmp_path / "w"),
            "--chunk-size",
            "500",
            "--log-interval",
            "0.2",
        )
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "Inst. speed:" in x]
    assert lines, r.stderr
    import re

    assert re.search(
        r"Inst\. speed: [\d.]+ docs/s \| Avg speed: [\d.]+ docs/s \| Total processed: \d+ \| ETA: ", lines[-1]
    )


def test_kill9_at_random_moments_then_resume_is_exact(tmp_path, server, corpus) -> None:
    path, records = corpus
    server.set_faults(latency=0.01)
    work = str(tmp_path / "w")
    args = [*CLI, "embed", path, "--tei-urls", server.embed_url, "--work-dir", work, "--chunk-size", "200"]
    rng = random.Random(11)
    for _ in range(8):
        p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 2.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        for f in glob.glob(os.path.join(work, "shards", "*.parquet")):
            pq.read_metadata(f)  # every published shard is complete
    r = run_cli("embed", path, "--tei-urls", server.embed_url, "--work-dir", work, "--chunk-size", "200")
    assert r.returncode == 0, r.stderr
    assert_exact(os.path.join(work, "shards"), records)
    assert not [n for n in os.listdir(os.path.join(work, "shards")) if n.startswith(".")]


def test_flaky_server_output_complete_and_correct(tmp_path, corpus) -> None:
    path, records = corpus
    with TEIServer(
        dim=DIM,
        max_client_batch_size=16,
        p_429=0.1,
        p_503=0.05,
        p_drop=0.03,
        p_nan=0.02,
        p_bad_count=0.02,
        seed=5,
    ) as srv:
        r = run_cli("embed", path, "--tei-urls", srv.embed_url, "--work-dir", str(tmp_path / "w"))
        assert r.returncode == 0, r.stderr
        c = srv.counters
    assert c["429"] > 0 and c["503"] > 0 and c["dropped"] > 0 and c["nan"] > 0
    assert "retry_429=" in r.stderr and "retry_bad_answer=" in r.stderr
    assert_exact(str(tmp_path / "w" / "shards"), records)


def test_second_process_on_same_work_dir_is_refused(tmp_path, corpus) -> None:
    path, _ = corpus
    with TEIServer(dim=DIM, latency=0.2) as srv:
        work = str(tmp_path / "w")
        first = subprocess.Popen(
            [*CLI, "embed", path, "--tei-urls", srv.url, "--work-dir", work, "--chunk-size", "100"],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(work, "progress", "plan.json")) and time.time() < deadline:
            time.sleep(0.05)
        second = run_cli("embed", path, "--tei-urls", srv.url, "--work-dir", work, "--chunk-size", "100")
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert second.returncode == 4
    assert "already running" in second.stderr
    assert first.returncode == 130


def test_rejected_inputs_are_reported_with_line_numbers(tmp_path, server) -> None:
    lines = [
        b'\xef\xbb\xbf{"_id": "ok1", "text": "first"}\r',
        b'{"_id": "bad-json", "text": ',
        b'["an", "array"]',
        b'{"text": "no id"}',
        b'{"_id": {"$oid": "5f1d7a3b2c1e4a0012345678"}, "text": "oid"}',
        b'{"_id": 12345, "text": "integer id"}',
        b'{"_id": "e", "text": ""}',
        b'{"_id": "n", "text": null}',
        b'{"_id": "m"}',
        b'{"_id": "num", "text": 5}',
        b'{"_id": "lst", "text": ["x"]}',
        b"",
        b'{"_id": "sur", "text": "lone \\ud83d surrogate"}',
        b'{"_id": "long", "text": "' + b"word " * 20000 + b'"}',
        b'{"_id": "rtl", "text": "\xd9\x85\xd8\xb1\xd8\xad\xd8\xa8\xd8\xa7 \xf0\x9f\x98\x80"}',
        b'{"_id": "last", "text": "no newline at the end"}',
    ]
    p = tmp_path / "messy.jsonl"
    p.write_bytes(b"\n".join(lines))
    r = run_cli("embed", str(p), "--tei-urls", server.embed_url, "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    ids, _ = read_output(str(tmp_path / "w" / "shards"))
    assert ids == ["ok1", "5f1d7a3b2c1e4a0012345678", "12345", "sur", "long", "rtl", "last"]
    rejects = [orjson.loads(x) for x in open(tmp_path / "w" / "progress" / "rejects.jsonl", "rb")]
    got = [(x["line"], x["reason"].split(" (")[0].split(":")[0]) for x in rejects]
    assert got == [
        (2, "malformed JSON"),
        (3, "not a JSON object"),
        (4, "missing id field '_id'"),
        (7, "text is empty"),
        (8, "text is null"),
        (9, "missing text field 'text'"),
        (10, "text is not a string"),
        (11, "text is not a string"),
    ]
    assert "Rejected: 8 lines" in r.stderr
    assert server.embedded["lone \ufffd surrogate"] == 1


def test_no_server_means_embedded_model(tmp_path) -> None:
    """The embedded default: all-MiniLM-L6-v2 in-process, offline, on a slice of the bundled sample."""
    p = sample_slice(tmp_path, 120)
    r = run_cli("embed", str(p), "--work-dir", str(tmp_path / "w"), "--chunk-size", "50")
    assert r.returncode == 0, r.stderr
    ids, vecs = read_output(str(tmp_path / "w" / "shards"))
    assert len(ids) == 120 and vecs.shape == (120, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
    md = pq.read_schema(glob.glob(str(tmp_path / "w" / "shards" / "*.parquet"))[0]).metadata
    assert md[b"tweet_embed.model"] == b"sentence-transformers/all-MiniLM-L6-v2"


def test_two_workers_per_device_match_one_process(tmp_path) -> None:
    """``--workers-per-device 2`` (here on the CPU): two worker processes with the real model write the
    same rows and vectors as one process, and a resume after it sends nothing."""
    p = sample_slice(tmp_path, 200)
    one = run_cli("embed", str(p), "--work-dir", str(tmp_path / "one"), "--chunk-size", "40")
    assert one.returncode == 0, one.stderr
    args = ["embed", str(p), "--work-dir", str(tmp_path / "two"), "--chunk-size", "40"]
    two = run_cli(*args, "--devices", "cpu", "--workers-per-device", "2")
    assert two.returncode == 0, two.stderr
    assert "2 device workers ready (cpu#0, cpu#1)" in two.stderr
    ids1, vecs1 = read_shards(str(tmp_path / "one" / "shards"), 384)[:2]
    ids2, vecs2 = read_shards(str(tmp_path / "two" / "shards"), 384)[:2]
    assert ids2 == ids1 and len(ids1) == 200
    np.testing.assert_allclose(vecs2, vecs1, atol=1e-5)
    again = run_cli(*args, "--devices", "cpu", "--workers-per-device", "2")
    assert again.returncode == 0 and "(5 of 5 already done)" in again.stderr, again.stderr


def test_workers_per_device_is_for_the_local_model(tmp_path, server) -> None:
    r = run_cli("embed", "x.jsonl", "--tei-urls", server.embed_url, "--workers-per-device", "2")
    assert r.returncode == 2 and "in-process model" in r.stderr
    r = run_cli("embed", "x.jsonl", "--workers-per-device", "0", "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 2 and "at least 1" in r.stderr


def test_dtype_bf16_on_cpu_and_fp16_refused(tmp_path) -> None:
    """``--dtype``: bf16 runs on the CPU (recorded in the shards), close to fp32; fp16 there is a clear error."""
    p = sample_slice(tmp_path, 60)
    r32 = run_cli("embed", str(p), "--work-dir", str(tmp_path / "fp32"))
    r16 = run_cli("embed", str(p), "--work-dir", str(tmp_path / "bf16"), "--dtype", "bf16")
    assert r32.returncode == 0 and r16.returncode == 0, r16.stderr
    ids32, v32 = read_shards(str(tmp_path / "fp32" / "shards"), 384)[:2]
    ids16, v16 = read_shards(str(tmp_path / "bf16" / "shards"), 384)[:2]
    assert ids16 == ids32 and len(ids16) == 60
    cos = (v32 * v16).sum(axis=1)
    assert cos.min() > 0.99 and not np.array_equal(v32, v16)
    shard = glob.glob(str(tmp_path / "bf16" / "shards" / "*.parquet"))[0]
    assert pq.read_schema(shard).metadata[b"tweet_embed.dtype"] == b"bfloat16"
    bad = run_cli("embed", str(p), "--work-dir", str(tmp_path / "fp16"), "--dtype", "fp16", "--device", "cpu")
    assert bad.returncode != 0 and "fp16 is for GPUs" in bad.stderr


def test_dtype_is_for_the_local_model(server) -> None:
    r = run_cli("embed", "x.jsonl", "--tei-urls", server.embed_url, "--dtype", "bf16")
    assert r.returncode == 2 and "in-process model" in r.stderr


def test_kill9_of_parent_leaves_no_worker_or_tokenizer_process(tmp_path) -> None:
    """Device workers and their tokenizer processes end with the parent, even when it dies by kill -9 in the
    middle of handing over a chunk; the resume then completes every row exactly once."""
    p = tmp_path / "in.jsonl"
    write_jsonl(str(p), 6000, seed=5)
    args = ["embed", str(p), "--work-dir", str(tmp_path / "w"), "--chunk-size", "200", "--model"]
    args += ["random:L1-H64", "--devices", "cpu", "--workers-per-device", "2", "--runtime", "torch"]
    # On CPU the backend starts no tokenizer processes unless asked (the model is the limit there): ask, so the
    # tree this test kills has them.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TWEET_EMBED_TOKENIZER_WORKERS="2")
    proc = subprocess.Popen([sys.executable, "-m", "tweet_embed", *args], cwd=ROOT, env=env)
    first = tmp_path / "w" / "progress" / "part-0000-0000000.done"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists() and proc.poll() is None, "the run ended or stalled before the first chunk"
    # The second worker may still be starting its tokenizer processes when the first chunk lands (CI, 2 busy
    # cores, saw 3 processes): wait for the whole tree, then kill in the middle of the run.
    kids = descendants(proc.pid)
    while len(kids) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        kids = descendants(proc.pid)
    assert proc.poll() is None, "the run ended before every worker was up"
    assert len(kids) >= 6, kids  # 2 workers with 2 tokenizer processes each, and the resource tracker
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [k for k in kids if alive(k)], "processes outlived their parent"
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    ids, _, _ = read_shards(str(tmp_path / "w" / "shards"), 64)
    assert ids == [t[0] for t in synth_tweets(6000, seed=5)]


def test_a_malformed_server_url_is_a_usage_error_naming_it(tmp_path) -> None:
    """A URL the HTTP client cannot use is refused before anything starts (exit 2, the URL named, no
    traceback), for ``embed``, the original ``embed_tweets.py`` line and ``plan``; credentials stay hidden."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"_id": "1", "text": "hello"}\n')
    work = str(tmp_path / "w")
    for cmd, url, shown in [
        (["embed", "--tei-urls"], ":///embed", "':///embed'"),
        (
            ["embed", "--tei-urls"],
            "http://127.0.0.1:8080/embed,http://gpu1:port/embed",
            "'http://gpu1:port/embed'",
        ),
        (["embed", "--openai-urls"], "gpu1:8080/v1/embeddings", "'gpu1:8080/v1/embeddings'"),
        (["embed", "--tei-urls"], "http://me:secret@gpu1:80x/embed", "'http://***@gpu1:80x/embed'"),
        (["plan", "--tei-urls"], "ftp://gpu1/embed", "'ftp://gpu1/embed'"),
    ]:
        r = run_cli(cmd[0], str(src), cmd[1], url, "--work-dir", work)
        assert r.returncode == 2, r.stderr
        assert f"{cmd[1]}: {shown} is not a usable server URL" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and "secret" not in r.stderr
    r = subprocess.run(
        [sys.executable, "embed_tweets.py", "--input-file", str(src), "--tei-urls", ":///embed"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "':///embed' is not a usable server URL" in r.stderr, r.stderr
    assert not (tmp_path / "w" / "shards").exists() or not list((tmp_path / "w" / "shards").iterdir())
