"""``embed --metrics-port``: Prometheus exposition through prometheus_client, scraped during a real run
against two real local servers (one failing now and then) and checked against the final summary."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path
from typing import Any

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


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def test_metrics_during_a_run_match_the_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 1500, seed=4)
    with src.open("ab") as f:
        f.write(b"{broken\n")
    servers: list[Any] = []
    during: list[dict[Any, float]] = []
    final: list[dict[Any, float]] = []
    real_init, real_close = metrics_mod.MetricsServer.__init__, metrics_mod.MetricsServer.close

    def init(self: Any, *a: Any, **kw: Any) -> None:
        real_init(self, *a, **kw)
        servers.append(self)

    def close(self: Any) -> None:  # the last scrape, at the very end of the run
        final.append(scrape(self.url))
        real_close(self)

    monkeypatch.setattr(metrics_mod.MetricsServer, "__init__", init)
    monkeypatch.setattr(metrics_mod.MetricsServer, "close", close)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.2):
            if servers:
                try:
                    during.append(scrape(servers[0].url))
                except OSError:  # the run ended between two polls
                    return

    with (
        TEIServer(dim=DIM, capacity=300, max_client_batch_size=16) as a,
        TEIServer(dim=DIM, capacity=300, max_client_batch_size=16, p_503=0.2, seed=3) as b,
    ):
        dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
        opts = EmbedOptions(inputs=[str(src)], dirs=dirs, chunk_lines=150, metrics_port=0, log_interval=0.5)
        spec = BackendSpec(urls=(a.embed_url, b.embed_url))
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            summary = run_embed(opts, spec)
        finally:
            stop.set()
            poller.join()
        served = {a.url.split("//")[1]: a.counters, b.url.split("//")[1]: b.counters}
    assert len(during) >= 2, "the run was too short to be scraped"
    [end] = final
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
    final: list[dict[Any, float]] = []
    real_close = metrics_mod.MetricsServer.close

    def close(self: Any) -> None:
        final.append(scrape(self.url))
        real_close(self)

    monkeypatch.setattr(metrics_mod.MetricsServer, "close", close)
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    opts = EmbedOptions(
        inputs=[str(src)], dirs=dirs, chunk_lines=100, log_interval=0.3, devices=["w0", "w1"], metrics_port=0
    )
    with TEIServer(dim=DIM, latency=0.05) as srv:
        summary = run_embed(opts, BackendSpec(urls=(srv.embed_url,)))
    [end] = final
    assert total(end, "tweet_embed_rows_total") == summary.rows == 600
    distinct = len({t for _, t in synth_tweets(600, seed=8)})  # each distinct text sent once (dedupe)
    assert total(end, "tweet_embed_texts_sent_total") == summary.embedded_texts == distinct
    assert end[("tweet_embed_chunks_done", ())] == 6
    events = read_journal(str(tmp_path / "w" / "progress"))
    start = next(e for e in events if e["event"] == "start")
    last_end = [e for e in events if e["event"] == "end"][-1]
    assert start["engine"] == "devices" and last_end["rows"] == 600
    assert [e for e in events if e["event"] == "interval"][-1]["chunks_done"] == 6
