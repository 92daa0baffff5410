"""Waiting is visible (the 5-second line and ``status``), and the run journal ``PROGRESS_DIR/events.jsonl``:
real CLI runs against real local servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson

from tweet_embed.embed.telemetry import read_journal, reject_kind
from tweet_embed.testing.server import TEIServer
from tweet_embed.testing.synth import write_jsonl

from conftest import ROOT, run_cli

DIM = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_mistyped_url_says_so_every_interval_and_in_status(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 50, seed=1)
    port = free_port()  # nothing listens there: connection refused
    work = tmp_path / "w"
    cmd = [sys.executable, "-m", "tweet_embed", "embed", str(src), "--tei-urls", f"http://127.0.0.1:{port}/embed",
           "--work-dir", str(work), "--log-interval", "1", "--max-retry-time", "8"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        seen = ""
        while proc.poll() is None and "waiting for servers" not in seen:
            time.sleep(0.5)
            seen = run_cli("status", "--work-dir", str(work), timeout=60).stdout
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    waiting = [ln for ln in err.splitlines() if "waiting for servers: none has answered for" in ln]
    assert len(waiting) >= 3, err  # every interval, not one warning and then silence
    assert "Inst. speed: " in waiting[0] and "(giving up after 8 s)" in waiting[0]
    assert f"127.0.0.1:{port} connection refused" in waiting[-1]
    assert "waiting for servers: none has answered for" in seen and f"127.0.0.1:{port}" in seen
    # Once the run has ended, status no longer claims it is waiting.
    assert "waiting for servers" not in run_cli("status", "--work-dir", str(work)).stdout


def test_a_server_dying_mid_run_shows_then_clears(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 1000, seed=2)
    # Few requests in flight (16 inputs of 8 a request), so few fail at once and the client's rest stays short.
    with TEIServer(dim=DIM, capacity=300, max_client_batch_size=8, max_concurrent_requests=16) as srv:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "tweet_embed", "embed", str(src), "--tei-urls", srv.embed_url,
               "--work-dir", str(tmp_path / "w"), "--log-interval", "1", "--chunk-size", "100"]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:  # kill the server once rows are flowing
            lines.append(line)
            if "Total processed: " in line and "Total processed: 0 " not in line:
                srv.set_faults(dead=True, revive_after=3.0)
                break
        _, rest = proc.communicate(timeout=120)
        lines += rest.splitlines()
    assert proc.returncode == 0, "".join(lines)
    speed = [ln for ln in lines if "Inst. speed" in ln]
    i = next(i for i, ln in enumerate(speed) if "waiting for servers" in ln)
    assert i > 0 and "waiting for servers" not in speed[0]  # fine before
    assert "connection refused" in "".join(speed[i:]), "".join(speed)
    assert any("Embedded 1000 rows" in ln for ln in lines)


def test_journal_lines_across_a_resume(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 400, seed=3)
    with src.open("ab") as f:  # two bad lines, two reasons
        f.write(b"{not json\n")
        f.write(b'{"_id": "x1", "text": ""}\n')
    work = tmp_path / "w"
    with TEIServer(dim=DIM, latency=0.1, max_client_batch_size=16) as srv:
        args = ["embed", str(src), "--tei-urls", srv.embed_url, "--work-dir", str(work), "--chunk-size", "100",
                "--log-interval", "0.5"]  # fmt: skip
        first = run_cli(*args, "--max-chunks", "2")
        assert first.returncode == 0, first.stderr
        second = run_cli(*args)
        assert second.returncode == 0, second.stderr
        embedded = srv.embedded
        sent = (
            sum(embedded.values()) - embedded["dimension probe"]
        )  # the backend's start-up probe, once a run
    events = read_journal(str(work / "progress"))
    starts = [e for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    assert len(starts) == 2 == len(ends) and starts[0]["run"] != starts[1]["run"]
    assert [e["run"] for e in ends] == [s["run"] for s in starts]
    assert starts[1]["chunks_done"] == 2 and starts[1]["chunks_total"] == 5
    assert sum(e["rows"] for e in ends) == 400 and sum(e["texts_sent"] for e in ends) == sent == 400
    for run in (starts[0]["run"], starts[1]["run"]):
        iv = [e for e in events if e["event"] == "interval" and e["run"] == run]
        end = next(e for e in ends if e["run"] == run)
        assert iv and iv[-1]["rows"] == end["rows"]  # the last interval line closes the count
        assert [e["rows"] for e in iv] == sorted(e["rows"] for e in iv)
    last = [e for e in events if e["event"] == "interval"][-1]
    assert last["chunks_done"] == 5 and last["waiting"] is None
    # Rejects by reason, against the rejects file.
    rejects = [orjson.loads(x) for x in (work / "progress" / "rejects.jsonl").read_bytes().splitlines()]
    assert last["rejects"] == dict(Counter(reject_kind(r["reason"]) for r in rejects)) and len(rejects) == 2
    ep = next(iter(last["endpoints"].values()))
    assert ep["requests"] > 0 and ep["inputs"] > 0 and ep["errors"] == {}
    p95s = [
        e["p95_ms"]
        for x in events
        if x["event"] == "interval"
        for e in x["endpoints"].values()
        if e["p95_ms"]
    ]
    assert p95s and min(p95s) >= 100  # the server's 0.1 s latency
    durations = [d for x in events if x["event"] == "interval" for d in x["chunk_seconds"]]
    # Chunks 1-4 each wait for the server's 0.1 s; chunk 5 holds only the two bad lines, sends nothing and may
    # commit in less (CI saw 0.066 s).
    assert len(durations) == 5 and sum(d > 0.1 for d in durations) >= 4, durations
    # Bounded: a line with one endpoint stays well under 1 kB (the docs' 24-hour figure builds on this).
    sizes = [len(orjson.dumps(e)) for e in events if e["event"] == "interval"]
    assert max(sizes) < 1000, max(sizes)


def test_worker_figures_sum_the_latest_report_of_each_worker() -> None:
    """The driver's sum of the workers' cumulative reports: a later report replaces that worker's earlier one,
    workers add up, a worker that restarted its backend (a new key) keeps what the old one counted, and the
    interval's latency quantiles come from histogram counts."""
    from tweet_embed.backends.pool import LATENCY_BUCKETS
    from tweet_embed.embed.telemetry import WorkerFigures, _bucket_quantile

    def ep(requests: int, in_flight: int, resting: bool, bucket: int) -> dict:
        counts = [0] * len(LATENCY_BUCKETS)
        counts[bucket] = requests
        return {"requests": requests, "inputs": 10 * requests, "errors": {"503": 1}, "latency_counts": counts,
                "latency_sum": 0.02 * requests, "in_flight": in_flight, "resting": resting}  # fmt: skip

    def dev(texts: int) -> dict:
        return {"batches": 1, "texts": texts, "tokens": 5 * texts, "padded_tokens": 8 * texts, "seconds": 0.5}

    f = WorkerFigures()
    f.update("a", "cuda:0#0", {"endpoints": {"h:1": ep(3, 4, False, 2)}, "devices": {"cuda:0": dev(10)},
                               "stats": {"retry_503": 1}})  # fmt: skip
    f.update("a", "cuda:0#0", {"endpoints": {"h:1": ep(5, 0, False, 2)}, "devices": {"cuda:0": dev(30)},
                               "stats": {"retry_503": 2}})  # fmt: skip
    f.update("b", "cuda:0#1", {"endpoints": {"h:1": ep(2, 6, True, 3)}, "devices": {"cuda:0": dev(7)},
                               "stats": {"retry_503": 1}})  # fmt: skip
    f.update("b2", "cuda:0#1", {"endpoints": {}, "devices": {"cuda:0": dev(1)}, "stats": {}})  # restarted
    e = f.endpoints()["h:1"]
    assert (e["requests"], e["inputs"], e["errors"], e["in_flight"], e["resting"]) == (
        7,
        70,
        {"503": 2},
        6,
        True,
    )
    assert e["latency_counts"][2:4] == [5, 2] and sum(e["latency_counts"]) == 7
    assert [(d, w, c["texts"], c["seconds"]) for d, w, c in f.devices()] == [
        ("cuda:0", "cuda:0#0", 30, 0.5),
        ("cuda:0", "cuda:0#1", 8, 1.0),
    ]
    assert f.stats() == {"retry_503": 3}
    # all in the (0.01, 0.025] bucket: linear inside it; the open last bucket answers with its lower bound
    assert _bucket_quantile(e["latency_counts"][:2] + [4] + [0] * (len(LATENCY_BUCKETS) - 3), 0.5) == 0.0175
    assert _bucket_quantile([0] * (len(LATENCY_BUCKETS) - 1) + [3], 0.95) == 60.0
    assert _bucket_quantile([0] * len(LATENCY_BUCKETS), 0.5) is None
