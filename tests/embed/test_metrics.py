"""``embed --metrics-port``: Prometheus exposition through prometheus_client, scraped during a real run
against two real local servers (one failing now and then) and checked against the final summary."""

from __future__ import annotations

import contextlib
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tweet_embed.backends import BackendSpec
from tweet_embed.embed import metrics as metrics_mod
from tweet_embed.embed.chunks import WorkDirs
from tweet_embed.embed.runner import EmbedOptions, run_embed
from tweet_embed.embed.telemetry import read_journal
from tweet_embed.testing.server import TEIServer
from tweet_embed.testing.synth import synth_tweets, write_jsonl

DIM = 16


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@dataclass
class Scrapes:
    during: list[dict[Any, float]] = field(default_factory=list)  # every 0.2 s of the run (with ``poll``)
    final: list[dict[Any, float]] = field(default_factory=list)  # one per /metrics server, as it closes


@contextlib.contextmanager
def scraped(monkeypatch: pytest.MonkeyPatch, poll: bool = False) -> Iterator[Scrapes]:
    """Scrape the /metrics server of each run inside: once as it closes (the very end of the run) and, with
    ``poll``, the first one every 0.2 s while it serves."""
    got = Scrapes()
    servers: list[Any] = []
    real_init, real_close = metrics_mod.MetricsServer.__init__, metrics_mod.MetricsServer.close

    def init(self: Any, *a: Any, **kw: Any) -> None:
        real_init(self, *a, **kw)
        servers.append(self)

    def close(self: Any) -> None:
        got.final.append(scrape(self.url))
        real_close(self)

    monkeypatch.setattr(metrics_mod.MetricsServer, "__init__", init)
    monkeypatch.setattr(metrics_mod.MetricsServer, "close", close)
    if not poll:
        yield got
        return
    stop = threading.Event()

    def poller() -> None:
        while not stop.wait(0.2):
            if servers:
                try:
                    got.during.append(scrape(servers[0].url))
                except OSError:  # the run ended between two polls
                    return

    thread = threading.Thread(target=poller)
    thread.start()
    try:
        yield got
    finally:
        stop.set()
        thread.join()


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_during_a_run_match_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 1500, seed=4)
    with src.open("ab") as f:
        f.write(b"{broken\n")
    with (
        TEIServer(dim=DIM, capacity=300, max_client_batch_size=16) as a,
        TEIServer(dim=DIM, capacity=300, max_client_batch_size=16, p_503=0.2, seed=3) as b,
    ):
        dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
        opts = EmbedOptions(inputs=[str(src)], dirs=dirs, chunk_lines=150, metrics_port=0, log_interval=0.5)
        spec = BackendSpec(urls=(a.embed_url, b.embed_url))
        with scraped(monkeypatch, poll=True) as scrapes:
            summary = run_embed(opts, spec)
        served = {a.url.split("//")[1]: a.counters, b.url.split("//")[1]: b.counters}
    during = scrapes.during
    assert len(during) >= 2, "the run was too short to be scraped"
    [end] = scrapes.final
    assert total(end, "tweet_embed_rows_total") == summary.rows == 1500
    assert total(end, "tweet_embed_texts_sent_total") == summary.embedded_texts
    assert end[("tweet_embed_distinct_texts", ())] == summary.distinct_texts > 0  # dedupe's count
    assert total(end, "tweet_embed_reused_rows_total") == summary.reused == 0
    assert end[("tweet_embed_rejects_total", (("reason", "malformed JSON"),))] == summary.rejected == 1
    retries = {k[len("retry_") :]: v for k, v in summary.stats.items() if k.startswith("retry_")}
    assert retries.get("503", 0) > 0
    assert {
        dict(lab)["cause"]: v for (n, lab), v in end.items() if n == "tweet_embed_retries_total"
    } == retries
    assert (
        end[("tweet_embed_chunks_done", ())] == end[("tweet_embed_chunks", ())] == summary.chunks_total == 11
    )
    for host, c in served.items():
        lab = (("endpoint", host),)
        # The client's count of answered requests is the server's 200s (the start-up probe included).
        assert end[("tweet_embed_endpoint_requests_total", lab)] == c["ok"]
        assert end[("tweet_embed_endpoint_latency_seconds_count", lab)] == c["ok"]
        assert end[("tweet_embed_endpoint_inputs_in_flight", lab)] == 0
    lab_b = (("endpoint", b.url.split("//")[1]), ("status", "503"))
    assert end[("tweet_embed_endpoint_errors_total", lab_b)] == served[b.url.split("//")[1]]["503"]
    # During the run: rows only grow, never past the summary, and the names are all tweet_embed_*.
    rows = [total(s, "tweet_embed_rows_total") for s in during]
    assert rows == sorted(rows) and rows[-1] <= summary.rows and any(0 < r < 1500 for r in rows)
    assert all(n.startswith("tweet_embed_") for s in during for (n, _) in s)


def test_devices_engine_journal_and_metrics_from_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--devices: the workers embed in their own processes; the driver's figures reach the journal and
    /metrics (no per-endpoint ones)."""
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 600, seed=8)
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    opts = EmbedOptions(
        inputs=[str(src)], dirs=dirs, chunk_lines=100, log_interval=0.3, devices=["w0", "w1"], metrics_port=0
    )
    with TEIServer(dim=DIM, latency=0.05) as srv, scraped(monkeypatch) as scrapes:
        summary = run_embed(opts, BackendSpec(urls=(srv.embed_url,)))
    [end] = scrapes.final
    assert total(end, "tweet_embed_rows_total") == summary.rows == 600
    distinct = len({t for _, t in synth_tweets(600, seed=8)})  # each distinct text sent once (dedupe)
    assert total(end, "tweet_embed_texts_sent_total") == summary.embedded_texts == distinct
    assert end[("tweet_embed_chunks_done", ())] == 6
    # the workers' pools, summed by the driver: the server's own count of answered requests and inputs
    host = srv.url.split("//")[1]
    assert end[("tweet_embed_endpoint_requests_total", (("endpoint", host),))] == srv.counters["ok"]
    assert end[("tweet_embed_endpoint_inputs_total", (("endpoint", host),))] == sum(srv.embedded.values())
    assert end[("tweet_embed_endpoint_latency_seconds_count", (("endpoint", host),))] == srv.counters["ok"]
    assert end[("tweet_embed_endpoint_inputs_in_flight", (("endpoint", host),))] == 0
    events = read_journal(str(tmp_path / "w" / "progress"))
    start = next(e for e in events if e["event"] == "start")
    last_end = [e for e in events if e["event"] == "end"][-1]
    assert start["engine"] == "devices" and last_end["rows"] == 600
    last = [e for e in events if e["event"] == "interval"][-1]
    assert last["chunks_done"] == 6
    assert last["endpoints"][host]["inputs"] == sum(srv.embedded.values())
    assert last["endpoints"][host]["p50_ms"] is None or last["endpoints"][host]["p50_ms"] >= 0


def test_devices_cpu_two_workers_per_device_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--devices cpu --workers-per-device 2`` with a ``random:`` model: each worker's batches, tokens and
    device seconds reach the driver's /metrics (scraped during the run and at its end) and the journal; the
    texts counted per device add up to the texts the summary says were sent."""
    from tweet_embed.embed.engines.devices import plan_workers

    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 3000, seed=9)
    model = "random:L2-H64"
    devices = plan_workers("cpu", None, model, 2)
    assert devices == ["cpu", "cpu"]
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    opts = EmbedOptions(
        inputs=[str(src)], dirs=dirs, chunk_lines=100, log_interval=0.5, devices=devices, metrics_port=0
    )
    with scraped(monkeypatch, poll=True) as scrapes:
        summary = run_embed(opts, BackendSpec(model=model, device="cpu", runtime="torch"))
    [end] = scrapes.final
    assert summary.rows == 3000 and summary.embedded_texts > 0

    def per_worker(samples: dict[Any, float], name: str) -> dict[str, float]:
        return {dict(lab)["worker"]: v for (n, lab), v in samples.items() if n == name}

    texts = per_worker(end, "tweet_embed_device_texts_total")
    assert set(texts) == {"cpu#0", "cpu#1"} and all(v > 0 for v in texts.values())  # both workers worked
    assert {dict(lab)["device"] for (n, lab) in end if n == "tweet_embed_device_texts_total"} == {"cpu"}
    assert sum(texts.values()) == summary.embedded_texts
    batches = per_worker(end, "tweet_embed_device_batches_total")
    tokens = per_worker(end, "tweet_embed_device_tokens_total")
    padded = per_worker(end, "tweet_embed_device_padded_tokens_total")
    seconds = per_worker(end, "tweet_embed_device_seconds_total")
    for w in texts:
        assert 0 < batches[w] <= texts[w] and texts[w] < tokens[w] <= padded[w] and seconds[w] > 0
    # during the run the counters grow, reported by the workers while they embed
    seen = [total(s, "tweet_embed_device_texts_total") for s in scrapes.during]
    assert seen == sorted(seen) and any(0 < v < summary.embedded_texts for v in seen)
    events = read_journal(str(tmp_path / "w" / "progress"))
    lines = [e for e in events if e["event"] == "interval"]
    last = lines[-1]["devices"]
    assert {w: d["texts"] for w, d in last.items()} == texts
    assert all(d["device"] == "cpu" and d["tokens"] == tokens[w] for w, d in last.items())
    assert max(len(orjson.dumps(e)) for e in lines) < 1000


def test_in_process_model_figures_per_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local engine with the in-process model (``random:`` shape, CPU): batches, texts, tokens and device
    seconds on /metrics and in the journal, against the summary."""
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 400, seed=10)
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    opts = EmbedOptions(inputs=[str(src)], dirs=dirs, chunk_lines=100, log_interval=0.5, metrics_port=0)
    with scraped(monkeypatch) as scrapes:
        summary = run_embed(opts, BackendSpec(model="random:L2-H64", device="cpu", runtime="torch"))
    [end] = scrapes.final
    lab = (("device", "cpu"), ("worker", "cpu"))
    assert end[("tweet_embed_device_texts_total", lab)] == summary.embedded_texts > 0
    assert end[("tweet_embed_device_tokens_total", lab)] == summary.stats["tokens"] > summary.embedded_texts
    assert end[("tweet_embed_device_padded_tokens_total", lab)] == summary.stats["padded_tokens"]
    assert end[("tweet_embed_device_batches_total", lab)] == summary.stats["batches"] > 0
    assert 0 < end[("tweet_embed_device_seconds_total", lab)] < summary.elapsed
    last = [e for e in read_journal(str(tmp_path / "w" / "progress")) if e["event"] == "interval"][-1]
    assert (
        last["devices"]["cpu"]["texts"] == summary.embedded_texts and "device" not in last["devices"]["cpu"]
    )
    assert last["devices"]["cpu"]["seconds"] == pytest.approx(
        end[("tweet_embed_device_seconds_total", lab)], abs=1e-3
    )
