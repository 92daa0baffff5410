"""``embed --metrics-port``: the run's figures in Prometheus' exposition format, through prometheus_client.

Why a custom collector: every figure already lives somewhere (progress counters, the endpoint pool, the
monitor); reading them at scrape time costs the run nothing between scrapes and can never disagree with
the summary.  prometheus_client does the format and the HTTP server (a daemon thread).

Names (all ``tweet_embed_``; counters end in ``_total``):
``rows_total``, ``texts_sent_total``, ``distinct_texts``, ``reused_rows_total``, ``rejects_total{reason}``, ``retries_total{cause}``,
``chunks_done`` and ``chunks`` (gauges, this run's plan, earlier runs included), ``eta_seconds``,
``docs_per_second`` (average of this run), ``waiting_seconds`` (no server has answered for this long while
work waits; 0 normally); per endpoint (label ``endpoint`` = host:port): ``endpoint_requests_total``,
``endpoint_inputs_total``, ``endpoint_errors_total{status}`` (HTTP status or cause: connection, timeout,
bad_answer), ``endpoint_inputs_in_flight``, ``endpoint_resting`` (1 while rested), and the histogram
``endpoint_latency_seconds``; per device of the in-process model (labels ``device`` = ``cpu``/``cuda:1``, on
Ray ``host/cuda:1``, and ``worker`` = the process: the device itself in-process, ``cuda:0#1`` under
``--devices``, ``host:pid`` on Ray): ``device_batches_total``, ``device_texts_total``,
``device_tokens_total`` (real tokens), ``device_padded_tokens_total`` and ``device_seconds_total``;
``backend{stat}`` carries the backend's own counters (the local model's).

With ``--devices`` and ``--engine ray`` the endpoint and device figures are the sum of what the workers
report (:class:`~tweet_embed.embed.telemetry.WorkerFigures`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tweet_embed.backends.pool import LATENCY_BUCKETS
from tweet_embed.embed.telemetry import RunMonitor

__all__ = ["MetricsServer", "collect"]


def collect(monitor: RunMonitor) -> Iterator[Any]:
    """The metric families for one scrape."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    yield CounterMetricFamily(
        "tweet_embed_rows", "Rows embedded and written in this run", value=monitor.rows()
    )
    yield CounterMetricFamily(
        "tweet_embed_texts_sent", "Texts sent to the backend in this run", value=monitor.sent()
    )
    distinct, reused = monitor.distinct_and_reused()
    yield GaugeMetricFamily(
        "tweet_embed_distinct_texts",
        "Distinct texts among the run's rows (0: not deduplicated)",
        value=distinct,
    )
    yield CounterMetricFamily(
        "tweet_embed_reused_rows", "Rows whose vector came from an earlier run", value=reused
    )
    rej = CounterMetricFamily("tweet_embed_rejects", "Input lines rejected, by reason", labels=["reason"])
    for reason, n in sorted(dict(monitor.rejects).items()):
        rej.add_metric([reason], n)
    yield rej
    ret = CounterMetricFamily("tweet_embed_retries", "Requests retried, by cause", labels=["cause"])
    for cause, n in sorted(monitor.retries().items()):
        ret.add_metric([cause], n)
    yield ret
    yield GaugeMetricFamily(
        "tweet_embed_chunks_done", "Chunks done (earlier runs included)", value=monitor.chunks_done()
    )
    yield GaugeMetricFamily("tweet_embed_chunks", "Chunks in the plan", value=monitor.chunks_total)
    eta = monitor.eta_seconds()
    yield GaugeMetricFamily(
        "tweet_embed_eta_seconds",
        "Estimated seconds to finish",
        value=eta if eta is not None else float("nan"),
    )
    yield GaugeMetricFamily(
        "tweet_embed_docs_per_second", "Average rows/s of this run", value=monitor.avg_docs_per_s()
    )
    yield GaugeMetricFamily(
        "tweet_embed_waiting_seconds",
        "Seconds no server has answered while work waits",
        value=monitor.waiting_seconds(),
    )
    labels = ["endpoint"]
    req = CounterMetricFamily("tweet_embed_endpoint_requests", "Requests answered", labels=labels)
    inp = CounterMetricFamily("tweet_embed_endpoint_inputs", "Inputs answered", labels=labels)
    err = CounterMetricFamily(
        "tweet_embed_endpoint_errors", "Failed requests by status", labels=[*labels, "status"]
    )
    fly = GaugeMetricFamily(
        "tweet_embed_endpoint_inputs_in_flight", "Inputs sent, not yet answered", labels=labels
    )
    rest = GaugeMetricFamily("tweet_embed_endpoint_resting", "1 while the endpoint is rested", labels=labels)
    lat = HistogramMetricFamily(
        "tweet_embed_endpoint_latency_seconds", "Request latency (answered)", labels=labels
    )
    for host, e in sorted(monitor.endpoint_figures().items()):
        req.add_metric([host], e["requests"])
        inp.add_metric([host], e["inputs"])
        for status, n in sorted(e["errors"].items()):
            err.add_metric([host, status], n)
        fly.add_metric([host], e["in_flight"])
        rest.add_metric([host], 1.0 if e["resting"] else 0.0)
        cumulative, buckets = 0, []
        for bound, n in zip(LATENCY_BUCKETS, e["latency_counts"], strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        lat.add_metric([host], buckets, sum_value=e["latency_sum"])
    yield from (req, inp, err, fly, rest, lat)
    dlabels = ["device", "worker"]
    families = {
        "batches": CounterMetricFamily(
            "tweet_embed_device_batches", "Forward batches the in-process model ran", labels=dlabels
        ),
        "texts": CounterMetricFamily(
            "tweet_embed_device_texts", "Texts the in-process model embedded", labels=dlabels
        ),
        "tokens": CounterMetricFamily(
            "tweet_embed_device_tokens", "Real (non-pad) tokens the model ran", labels=dlabels
        ),
        "padded_tokens": CounterMetricFamily(
            "tweet_embed_device_padded_tokens", "Tokens the model ran, padding included", labels=dlabels
        ),
        "seconds": CounterMetricFamily(
            "tweet_embed_device_seconds",
            "Device time in the model's forward (CPU: wall time of the calls; CUDA: GPU event time)",
            labels=dlabels,
        ),
    }
    for device, worker, counters in monitor.device_figures():
        for key, fam in families.items():
            fam.add_metric([device, worker], float(counters.get(key, 0)))
    yield from families.values()
    if monitor.backend is not None:
        stats = monitor.backend.stats()
    else:
        stats = monitor.workers.stats() if monitor.workers is not None else {}
    be = GaugeMetricFamily("tweet_embed_backend", "The backend's own counters", labels=["stat"])
    for k, v in sorted(stats.items()):
        be.add_metric([k], float(v))
    yield be


class MetricsServer:
    """Serves ``/metrics`` on ``addr:port`` while the run lasts (``port`` 0 picks a free one)."""

    def __init__(self, monitor: RunMonitor, port: int, addr: str = "127.0.0.1") -> None:
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as exc:  # a dependency; only a broken install lacks it
            raise RuntimeError(
                "--metrics-port needs prometheus_client (pip install prometheus_client)"
            ) from exc

        class _Collector:
            def collect(self) -> Iterator[Any]:
                return collect(monitor)

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector())  # type: ignore[arg-type]
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = self._server.server_port
        self.addr = addr

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
