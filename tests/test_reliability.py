"""Reliability: the real CLI against real local servers that overload, drop, hang, lie and die; crashes of
the pipeline itself; a full disk; two processes on one work dir.

Each test states one guarantee of docs/guarantees.md and fails if it does not hold.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from tweet_embed.parquet import file_sha256
from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets

from conftest import ROOT, alive, chunks_done, descendants, read_shards, run_cli

DIM = 16
PROBE = "dimension probe"


# ------------------------------------------------------------------------------------------------ helpers


def write_corpus(path: str, n: int, seed: int, bad_every: int = 0) -> list[tuple[str, str]]:
    """Synthetic tweets (optionally a malformed line after every ``bad_every`` good ones); returns the
    valid records in input order."""
    records = list(synth_tweets(n, seed=seed))
    with open(path, "wb") as fh:
        for i, (rid, text) in enumerate(records):
            if bad_every and i and i % bad_every == 0:
                fh.write(b'{"_id": "broken", "text": \n')
            fh.write(orjson.dumps({"_id": rid, "text": text}) + b"\n")
    return records


def read_output(shards: str) -> tuple[list[str], np.ndarray]:
    ids, vecs, _ = read_shards(shards, DIM)  # raises on an unreadable shard
    return ids, vecs


def assert_exact(work: str, records: list[tuple[str, str]]) -> None:
    """Every valid id exactly once, in input order, with the (bit-exact) vector of its own text."""
    ids, vecs = read_output(os.path.join(work, "shards"))
    assert len(ids) == len(set(ids)), "duplicated rows"
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))


def assert_consistent(work: str) -> int:
    """Every published shard is readable and every marker matches its shard byte for byte; returns the
    number of markers."""
    for p in glob.glob(os.path.join(work, "shards", "part-*.parquet")):
        pq.read_table(p)
    markers = glob.glob(os.path.join(work, "progress", "part-*.done"))
    for m in markers:
        with open(m, "rb") as fh:
            marker = orjson.loads(fh.read())
        assert file_sha256(os.path.join(work, "shards", marker["shard"])) == marker["sha256"], m
    return len(markers)


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "tweet_embed", *args]


def start_cli(log: str, *args: str) -> subprocess.Popen[bytes]:
    """The CLI in the background, stderr to a file (a pipe could fill up and block it)."""
    fh = open(log, "wb")  # noqa: SIM115 - closed by the child's exit; the test reads the file
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(cli_args(*args), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def retries(stderr: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for line in stderr.splitlines():
        if line.startswith("Backend: "):
            out.update({k: int(v) for k, v in re.findall(r"retry_(\w+)=(\d+)", line)})
    return out


@pytest.fixture
def corpus(tmp_path) -> tuple[str, list[tuple[str, str]]]:
    path = str(tmp_path / "tweets.jsonl")
    return path, write_corpus(path, 3000, seed=21)


# ------------------------------------------------------------------------------------------- server faults


def test_pool_of_three_flaky_servers_one_dies_half_way(tmp_path, corpus) -> None:
    """Each server: 10% 429, 5% 503, 2% dropped connections; one dies for good half-way. The run completes
    with every valid id once and the vector of its own text."""
    path, records = corpus
    work = str(tmp_path / "w")
    faults = dict(p_429=0.10, p_503=0.05, p_drop=0.02, latency=0.02)
    servers = [TEIServer(dim=DIM, max_client_batch_size=16, seed=s, **faults).start() for s in (1, 2, 3)]
    try:
        urls = ",".join(s.embed_url for s in servers)
        proc = start_cli(
            str(tmp_path / "log"),
            "embed",
            path,
            "--tei-urls",
            urls,
            "--work-dir",
            work,
            "--chunk-size",
            "150",
        )
        total = 20  # 3000 lines / 150
        wait_for(
            lambda: chunks_done(work) >= total // 2 or proc.poll() is not None, what="half of the chunks"
        )
        done_at_death = chunks_done(work)
        servers[0].set_faults(dead=True)
        served_before_death = servers[0].counters["ok"]
        assert proc.wait(timeout=240) == 0, open(tmp_path / "log").read()
        after = [s.counters for s in servers]
    finally:
        for s in servers:
            s.stop()
    log = open(tmp_path / "log").read()
    assert done_at_death < total, "the run finished before the server died: the test proved nothing"
    assert served_before_death > 0
    assert after[0]["ok"] == served_before_death  # dead for good: nothing answered after
    assert all(c["ok"] > 0 for c in after)
    assert all(sum(c[k] for c in after) > 0 for k in ("429", "503", "dropped"))
    r = retries(log)
    assert r["429"] > 0 and r["503"] > 0 and r["connection"] > 0
    assert_exact(work, records)
    assert "Embedded 3000 rows" in log


def test_bad_answers_are_retried_never_written(tmp_path, corpus) -> None:
    """Wrong number of vectors, wrong dimension, NaN: each is retried, and none reaches a shard (the output
    is bit-exact). Scripted first, then random for the rest of the run."""
    path, records = corpus
    work = str(tmp_path / "w")
    with TEIServer(
        dim=DIM, max_client_batch_size=16, seed=4, p_bad_count=0.05, p_bad_dim=0.05, p_nan=0.05
    ) as srv:
        # the first answer (the dimension probe) is good, then one of each bad kind in a row
        srv.queue_faults("ok", "bad_count", "bad_dim", "nan", "bad_dim", "nan", "bad_count")
        r = run_cli("embed", path, "--tei-urls", srv.embed_url, "--work-dir", work, "--chunk-size", "500")
        c = srv.counters
    assert r.returncode == 0, r.stderr
    assert c["bad_count"] > 2 and c["bad_dim"] > 2 and c["nan"] > 2
    assert retries(r.stderr)["bad_answer"] == c["bad_count"] + c["bad_dim"] + c["nan"]
    assert_exact(work, records)


def test_a_server_that_always_lies_is_never_believed(tmp_path, corpus) -> None:
    """In a pool with a good server, servers answering only NaN / a wrong dimension / a wrong count: all
    their answers are refused, the good one does the work, the output is exact."""
    path, records = corpus
    records = records[:800]
    with open(path, "wb") as fh:
        fh.write(b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in records))
    work = str(tmp_path / "w")
    good = TEIServer(dim=DIM, max_client_batch_size=16).start()
    liars = [
        TEIServer(dim=DIM, max_client_batch_size=16, **{p: 1.0}).start()
        for p in ("p_nan", "p_bad_dim", "p_bad_count")
    ]
    try:
        urls = ",".join(s.embed_url for s in [good, *liars])  # the dimension is learned from the first
        r = run_cli("embed", path, "--tei-urls", urls, "--work-dir", work, "--chunk-size", "200")
        lies = sum(s.counters[k] for s in liars for k in ("nan", "bad_dim", "bad_count"))
        good_texts = good.embedded
    finally:
        for s in [good, *liars]:
            s.stop()
    assert r.returncode == 0, r.stderr
    assert lies >= 3 and retries(r.stderr)["bad_answer"] == lies
    assert_exact(work, records)
    assert good_texts == Counter({t: 1 for _, t in records}) + Counter([PROBE])  # each distinct text once


def test_hanging_server_times_out_and_is_retried_elsewhere(tmp_path, corpus) -> None:
    """A server that accepts and never answers: each request to it ends at --request-timeout and goes to
    the other server; the output is exact and the good server embedded every text exactly once."""
    path, records = corpus
    records = records[:1000]
    with open(path, "wb") as fh:
        fh.write(b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in records))
    work = str(tmp_path / "w")
    hanging = TEIServer(dim=DIM, max_client_batch_size=16, p_hang=1.0).start()
    good = TEIServer(dim=DIM, max_client_batch_size=16).start()
    try:
        # the hanging server first: even the dimension probe goes there and must time out
        urls = f"{hanging.embed_url},{good.embed_url}"
        r = run_cli(
            "embed",
            path,
            "--tei-urls",
            urls,
            "--work-dir",
            work,
            "--request-timeout",
            "1",
            "--chunk-size",
            "250",
        )
        hung = hanging.counters["hung"]
        good_texts = good.embedded
    finally:
        hanging.stop()
        good.stop()
    assert r.returncode == 0, r.stderr
    # every hang ended in a timeout (a slow answer on a loaded machine may time out too)
    assert hung >= 1 and retries(r.stderr)["timeout"] >= hung
    assert_exact(work, records)
    assert set(good_texts) == {t for _, t in records} | {PROBE}  # all of it answered by the other server


def test_all_servers_down_waits_then_exits_naming_them_and_resumes_later(tmp_path, corpus) -> None:
    """Both servers die mid-run: the run keeps trying for --max-retry-time, exits 3 with a message naming
    each endpoint and its last error, keeps its finished chunks; once the servers are back, the same command
    completes without re-sending the finished chunks."""
    path, records = corpus
    work = str(tmp_path / "w")
    servers = [TEIServer(dim=DIM, max_client_batch_size=16, latency=0.03, seed=s).start() for s in (1, 2)]
    try:
        args = [
            "embed",
            path,
            "--tei-urls",
            ",".join(s.embed_url for s in servers),
            "--work-dir",
            work,
            "--chunk-size",
            "150",
            "--max-retry-time",
            "3",
        ]
        proc = start_cli(str(tmp_path / "log"), *args)
        wait_for(lambda: chunks_done(work) >= 3 or proc.poll() is not None, what="three chunks")
        for s in servers:
            s.set_faults(dead=True)
        t_dead = time.monotonic()
        rc = proc.wait(timeout=120)
        waited = time.monotonic() - t_dead
        log = open(tmp_path / "log").read()
        assert rc == 3, log
        assert waited >= 3.0  # it kept trying for --max-retry-time before giving up
        assert "no embedding endpoint answered for 3 s" in log
        for s in servers:
            assert re.search(rf"  {re.escape(s.embed_url)}: \S+", log), log  # each endpoint, its last error
        assert "re-run the same command to resume" in log
        done = assert_consistent(work)
        assert 3 <= done < 20
        done_chunks = {os.path.basename(m)[: -len(".done")] for m in glob.glob(f"{work}/progress/*.done")}
        for s in servers:
            s.reset_counters()
            s.set_faults(dead=False, latency=0.0)
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        sent: Counter[str] = Counter()
        for s in servers:
            sent.update(s.embedded)
    finally:
        for s in servers:
            s.stop()
    assert_exact(work, records)
    # only the chunks that were not finished were sent again
    per_chunk = [records[i : i + 150] for i in range(0, 3000, 150)]
    pending = {
        t for i, chunk in enumerate(per_chunk) if f"part-0000-{i:07d}" not in done_chunks for _, t in chunk
    }
    first_in_done: set[str] = set()  # texts whose first occurrence is in a finished chunk: never sent again
    seen: set[str] = set()
    for i, chunk in enumerate(per_chunk):
        for _, t in chunk:
            if t not in seen and f"part-0000-{i:07d}" in done_chunks:
                first_in_done.add(t)
            seen.add(t)
    assert sent[PROBE] == 1 and all(n == 1 for n in sent.values())  # nothing sent twice (dedupe)
    assert 1 < len(sent) and set(sent) - {PROBE} <= pending - first_in_done


@pytest.mark.parametrize("model_flag", [False, True], ids=["model-from-info", "model-given"])
def test_servers_down_from_the_start(tmp_path, model_flag: bool) -> None:
    """No server reachable at all (not started yet, wrong port): wait --max-retry-time, then exit 3 naming
    every endpoint and its last error; nothing is written."""
    path = str(tmp_path / "t.jsonl")
    write_corpus(path, 10, seed=1)
    ports = []
    for _ in range(2):
        with TEIServer(dim=DIM) as s:  # a port that was free a moment ago: connections are refused
            ports.append(s.port)
    urls = [f"http://127.0.0.1:{p}/embed" for p in ports]
    extra = ["--model", "m"] if model_flag else []
    t0 = time.monotonic()
    r = run_cli(
        "embed",
        path,
        "--tei-urls",
        ",".join(urls),
        "--work-dir",
        str(tmp_path / "w"),
        "--max-retry-time",
        "2",
        *extra,
    )
    assert r.returncode == 3, r.stderr
    assert time.monotonic() - t0 >= 2.0
    for u in urls:
        assert re.search(rf"  {re.escape(u)}: .*(onnect|refused)", r.stderr), r.stderr
    assert not glob.glob(str(tmp_path / "w" / "shards" / "*.parquet"))


# ------------------------------------------------------------------------------------------ pipeline crashes


def test_kill9_at_50_random_moments_gives_the_uninterrupted_output(tmp_path) -> None:
    """Property: whatever moment the pipeline is killed at (start-up, planning, embedding, writing a shard,
    a marker, the rejects), every published shard stays readable, every marker matches its shard, no process
    of the killed run lives on, and after a final resume the output (shard names, ids, vectors, rejects) is
    identical to an uninterrupted run's.

    Half of the moments are random times in start-up, planning and the first chunk; the other half wait for
    the run to finish 1-3 chunks and kill within the next few milliseconds, so that many kills land in the
    middle of the work however fast or loaded the machine is."""
    path = str(tmp_path / "t.jsonl")
    records = write_corpus(path, 8000, seed=5, bad_every=97)
    n_chunks = (8000 + 8000 // 97 + 24) // 25
    ref, work = str(tmp_path / "ref"), str(tmp_path / "w")
    common = ["--chunk-size", "25", "--chunks-in-flight", "1", "--batch-size", "16"]
    with TEIServer(dim=DIM, max_client_batch_size=16) as fast:
        r = run_cli("embed", path, "--tei-urls", fast.embed_url, "--work-dir", ref, *common)
        assert r.returncode == 0, r.stderr
    rng = random.Random(50)
    mid_work = 0
    with TEIServer(dim=DIM, max_client_batch_size=16, latency=0.02) as srv:
        args = cli_args("embed", path, "--tei-urls", srv.embed_url, "--work-dir", work, *common)
        for i in range(50):
            before = chunks_done(work)
            # decoding in one thread starts faster; every fifth run uses the default decode processes
            extra = [] if i % 5 == 4 else ["--workers", "1"]
            t0 = time.monotonic()
            p = subprocess.Popen(args + extra, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if i % 2 == 1:
                # a random moment of start-up, planning and the first chunk (never later: the progress of each
                # run stays small however fast or loaded the machine is)
                until = t0 + rng.uniform(0.0, 2.0)
                while time.monotonic() < until and chunks_done(work) == before and p.poll() is None:
                    time.sleep(0.002)
            else:
                # in the middle of the work: after 1-3 more chunks, then a few milliseconds
                target = before + rng.randint(1, 3)
                deadline = time.monotonic() + 60
                while chunks_done(work) < target and p.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.05))
            kids = descendants(p.pid)
            p.send_signal(signal.SIGKILL)
            p.wait()
            mid_work += chunks_done(work) > before and p.returncode == -signal.SIGKILL
            wait_for(
                lambda kids=kids: not any(alive(k) for k in kids),
                timeout=30,
                what="the killed run's processes to end",
            )
            assert_consistent(work)
        assert chunks_done(work) < n_chunks, "the loop finished the job: the kills proved little"
        srv.set_faults(latency=0.0)
        r = run_cli("embed", path, "--tei-urls", srv.embed_url, "--work-dir", work, *common)
    assert r.returncode == 0, r.stderr
    assert mid_work >= 20  # many kills landed while chunks were being done
    assert_exact(work, records)
    names = sorted(os.listdir(os.path.join(work, "shards")))
    assert names == sorted(os.listdir(os.path.join(ref, "shards")))  # no leftovers, no extra shards
    assert len(names) == n_chunks
    for n in names:
        assert pq.read_table(os.path.join(work, "shards", n)).equals(
            pq.read_table(os.path.join(ref, "shards", n))
        )
    with (
        open(os.path.join(work, "progress", "rejects.jsonl"), "rb") as a,
        open(os.path.join(ref, "progress", "rejects.jsonl"), "rb") as b,
    ):
        assert a.read() == b.read()
    assert not os.listdir(os.path.join(work, "tmp"))


def test_second_embed_on_the_same_work_dir_is_refused_and_corrupts_nothing(tmp_path, corpus) -> None:
    """While one run works, a second (even with --restart) exits 4 naming the lock holder and touches
    nothing; the first completes exactly."""
    path, records = corpus
    work = str(tmp_path / "w")
    with TEIServer(dim=DIM, max_client_batch_size=16, latency=0.03) as srv:
        args = ["embed", path, "--tei-urls", srv.embed_url, "--work-dir", work, "--chunk-size", "150"]
        first = start_cli(str(tmp_path / "log"), *args)
        wait_for(lambda: chunks_done(work) >= 2 or first.poll() is not None, what="two chunks")
        srv.set_faults(latency=1.0)  # hold the first run in the middle of its work
        seconds = [run_cli(*args), run_cli(*args, "--restart")]
        still_running = first.poll() is None
        done_mid = chunks_done(work)
        srv.set_faults(latency=0.0)
        assert first.wait(timeout=240) == 0, open(tmp_path / "log").read()
    assert still_running, "the first run ended before the second started: the test proved nothing"
    for s in seconds:
        assert s.returncode == 4, s.stderr
        assert re.search(r"another tweet-embed process is already running on .* \(pid \d+\)", s.stderr)
    assert done_mid >= 2  # --restart of the refused process deleted nothing
    assert_exact(work, records)
    assert_consistent(work)


# ------------------------------------------------------------------------------------------------ disk full


@pytest.fixture
def small_disk(tmp_path) -> Iterator[str]:
    """A 160 KiB tmpfs mounted for this test (needs root / CAP_SYS_ADMIN; skipped with the reason if not)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("disk-full test needs mount(8), which is not installed")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(
            f"disk-full test needs to mount a small tmpfs and this machine refused: {r.stderr.strip()}"
        )
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def grow(mnt: str) -> None:
    subprocess.run(["mount", "-o", "remount,size=16m", mnt], check=True)


@pytest.mark.parametrize("layout", ["work-dir-on-small-disk", "only-shards-on-small-disk"])
def test_disk_full_is_a_clear_error_and_resume_completes(tmp_path, small_disk, corpus, layout) -> None:
    """The disk fills up while shards are written: exit 1 with 'No space left on device' and the advice to
    resume, no unreadable or partial shard (also when the shards dir is another filesystem than the staging
    dir), no staging leftovers; after space is freed the same command completes exactly."""
    path, records = corpus
    if layout == "work-dir-on-small-disk":
        work = os.path.join(small_disk, "w")
        dirs = ["--work-dir", work]
    else:
        work = str(tmp_path / "w")
        dirs = ["--work-dir", work, "--output-dir", os.path.join(small_disk, "shards")]
    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        args = ["embed", path, "--tei-urls", srv.embed_url, *dirs, "--chunk-size", "150"]
        r = run_cli(*args)
        assert r.returncode == 1, r.stderr
        assert "disk full: " in r.stderr and os.strerror(errno.ENOSPC) in r.stderr
        assert "free space and re-run the same command to resume" in r.stderr
        assert "Traceback" not in r.stderr
        shards = (
            os.path.join(small_disk, "shards") if layout != "work-dir-on-small-disk" else f"{work}/shards"
        )
        published = sorted(glob.glob(os.path.join(shards, "part-*.parquet")))
        assert len(published) < 20
        for p in published:
            pq.read_table(p)  # complete, or not there at all
        leftovers = [
            n
            for d in (shards, os.path.join(work, "tmp"))
            if os.path.isdir(d)
            for n in os.listdir(d)
            if n.startswith(".")
        ]
        assert not leftovers, leftovers
        grow(small_disk)
        r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    ids, vecs = read_output(shards)
    assert ids == [x[0] for x in records]
    np.testing.assert_array_equal(vecs, expected_vectors([x[1] for x in records], DIM))
