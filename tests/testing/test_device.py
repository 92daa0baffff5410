"""Capacity mode: one simulated device at C docs/s (FIFO) and TEI 1.9.3's per-input admission (429)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tweet_embed.testing.server import Device, Permits, ServerProcess, TEIServer

DIM = 16


def post(url: str, payload: Any, timeout: float = 30.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_device_books_work_in_arrival_order() -> None:
    dev = Device(capacity=100.0)
    assert dev.book(10, now=5.0) == pytest.approx(5.1)  # idle device: starts at once
    assert dev.book(20, now=5.0) == pytest.approx(5.3)  # queued behind the first
    assert dev.book(1, now=9.0) == pytest.approx(9.01)  # idle again by then
    assert dev.busy_seconds == pytest.approx(0.31)
    with pytest.raises(ValueError):
        Device(capacity=0)


def test_permits_count_inputs_and_refuse_a_batch_that_does_not_fit() -> None:
    p = Permits(limit=10)
    assert p.try_acquire(6) and not p.try_acquire(5) and p.held == 6  # refused whole, keeps none
    assert p.try_acquire(4) and p.held == 10 and p.max_held == 10
    p.release(6)
    assert p.try_acquire(6) and not p.try_acquire(1) and p.held == 10


def test_capacity_caps_throughput_whatever_the_concurrency() -> None:
    """2,000 docs at C=4,000 docs/s cannot take less than 0.5 s, even from 8 concurrent clients."""
    texts = [f"doc {i}" for i in range(2000)]
    batches = [texts[i : i + 25] for i in range(0, len(texts), 25)]
    with TEIServer(dim=DIM, capacity=4000, max_client_batch_size=32) as srv:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            statuses = [s for s, _ in pool.map(lambda b: post(srv.embed_url, {"inputs": b}), batches)]
        elapsed = time.perf_counter() - t0
        c = srv.counters
    assert statuses == [200] * len(batches)
    assert c["texts"] == 2000 and c["max_in_flight_requests"] > 1  # requests did overlap
    assert 0.45 <= elapsed < 5.0, elapsed


def test_429_once_queued_inputs_would_pass_max_concurrent_requests() -> None:
    """TEI 1.9.3: a request of n inputs is refused when held permits + n > max_concurrent_requests."""
    with TEIServer(dim=DIM, capacity=40, max_concurrent_requests=50, max_client_batch_size=32) as srv:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(
                post, srv.embed_url, {"inputs": [f"a{i}" for i in range(30)]}
            )  # 0.75 s of work
            time.sleep(0.2)
            assert srv.counters["queued_inputs"] == 30
            status, body = post(srv.embed_url, {"inputs": [f"b{i}" for i in range(21)]})  # 30 + 21 > 50
            assert (status, body) == (429, {"error": "Model is overloaded", "error_type": "Overloaded"})
            status, body = post(srv.openai_url, {"input": [f"c{i}" for i in range(21)]})
            assert status == 429 and body["error_type"] == "Overloaded" and body["code"] == 429
            second = pool.submit(
                post, srv.embed_url, {"inputs": [f"d{i}" for i in range(20)]}
            )  # 30 + 20 fits
            assert first.result()[0] == 200 and second.result()[0] == 200
        c = srv.counters
        assert c["overloaded"] == 2 and c["429"] == 2 and c["max_queued_inputs"] == 50
        assert c["queued_inputs"] == 0 and c["texts"] == 50
        assert c["texts_received"] == 30 + 21 + 21 + 20  # refused texts were received too
        assert (
            'te_request_failure{err="overloaded"} 2'
            in urllib.request.urlopen(srv.url + "/metrics").read().decode()
        )


def test_capacity_from_the_command_line_in_a_child_process() -> None:
    proc = ServerProcess({})

    # The CLI flags, not --config-json, so `python -m tweet_embed.testing.server --capacity ...` is covered.
    def command() -> list[str]:
        return [*ServerProcess.command(proc)[:3], "--dim", str(DIM), "--capacity", "200",
                "--max-concurrent-requests", "40"]  # fmt: skip

    proc.command = command  # type: ignore[method-assign]
    with proc:
        info = json.loads(urllib.request.urlopen(proc.url + "/info").read())
        assert info["max_concurrent_requests"] == 40
        t0 = time.perf_counter()
        assert post(proc.embed_url, {"inputs": [f"x{i}" for i in range(30)]})[0] == 200
        assert time.perf_counter() - t0 >= 0.14  # 30 docs at 200 docs/s = 0.15 s
        assert proc.counters["texts"] == 30 and proc.counters()["texts_received"] == 30
