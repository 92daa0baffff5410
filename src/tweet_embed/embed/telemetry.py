"""What a running embed shows the outside: the run journal (``PROGRESS_DIR/events.jsonl``), the figures the
Prometheus endpoint serves (:mod:`tweet_embed.embed.metrics`), and the "waiting for servers" note.

One :class:`RunMonitor` per run reads the figures where they already live — the progress counters, the
summary, the backend's endpoint pool — so nothing on the hot path does extra work for it; a thread writes a
journal line every interval.

The journal: one JSON object a line, appended across resumes; every line names its ``run`` (a fresh id per
invocation).  ``{"event": "start", ...}`` opens a run, ``{"event": "interval", ...}`` follows every
``interval`` seconds, and ``{"event": "end", ...}`` closes a run that ended (a killed run has none).  An
interval line holds cumulative counts (rows, texts sent, rejects by reason, retries by cause, chunks) and the
interval's own figures (docs/s, each endpoint's p50/p95 latency and inputs answered, chunk durations).  Its
size: about 600 bytes with two endpoints (``bench/plan_accuracy.py`` prints it), about 200 more per further
endpoint, so a 24-hour run at the default 5 s interval with two servers writes about 17,280 × 600 B ≈ 10 MB.
On an object store the journal is rewritten whole once a minute and at the end (objects cannot be appended).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson

from tweet_embed import storage
from tweet_embed.backends.base import Backend, merge_endpoint
from tweet_embed.backends.pool import LATENCY_BUCKETS
from tweet_embed.progress import Progress

log = logging.getLogger("tweet_embed")

JOURNAL_NAME = "events.jsonl"
REMOTE_FLUSH_SECONDS = 60.0  # object stores: rewrite the journal at most this often


def journal_path(progress_dir: str) -> str:
    return (
        storage.join(progress_dir, JOURNAL_NAME)
        if storage.is_uri(progress_dir)
        else os.path.join(progress_dir, JOURNAL_NAME)
    )


def read_journal(progress_dir: str) -> list[dict[str, Any]]:
    """Every readable line of the journal (a torn last line from a crash is skipped)."""
    data = storage.read_bytes(journal_path(progress_dir))
    out = []
    for line in (data or b"").splitlines():
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def reject_kind(reason: str) -> str:
    """A reject reason without its particulars (quoted values, numbers, details after a colon), so the
    metrics label and the journal keys stay few: "invalid id 'x'" → "invalid id"."""
    head = re.split(r"[:(\"'{\[]", reason, maxsplit=1)[0]
    words = [w for w in head.split() if not any(ch.isdigit() for ch in w)]
    return " ".join(words)[:60] or "other"


def _bucket_quantile(counts: list[int], q: float) -> float | None:
    """A quantile from latency histogram counts (``LATENCY_BUCKETS``), linear within the bucket, as
    Prometheus' ``histogram_quantile`` does; the open last bucket answers with its lower bound. For figures
    that come from other processes, which send counts, not each latency."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen, lower = 0, 0.0
    for bound, n in zip(LATENCY_BUCKETS, counts, strict=True):
        if n and seen + n >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - seen) / n
        seen += n
        lower = bound if bound != float("inf") else lower
    return lower


class WorkerFigures:
    """The driver's copy of what each worker process last reported (``Backend.telemetry``: cumulative
    counters per endpoint and per device, and the backend's stats), summed for /metrics and the journal.

    Each worker sends its whole cumulative snapshot, so a report that is lost or late only delays figures,
    and keeping the latest per worker (``key``: one per backend instance, so a worker that restarts its
    backend adds to, not replaces, what the old one counted) and summing them is exact. Gauges (inputs in
    flight, resting) are as of each worker's last report.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[str, dict[str, Any]]] = {}

    def update(self, key: str, worker: str, snapshot: dict[str, Any]) -> None:
        with self._lock:
            self._latest[key] = (worker, snapshot)

    def _snapshots(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self._latest.values())

    def reported(self) -> bool:
        with self._lock:
            return bool(self._latest)

    def endpoints(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for _, snap in self._snapshots():
            for host, e in (snap.get("endpoints") or {}).items():
                out[host] = merge_endpoint(out.get(host), e)
        return out

    def devices(self) -> list[tuple[str, str, dict[str, float]]]:
        """``(device, worker, counters)``, one per device of each worker (a worker that restarted its backend
        reports under two keys: summed)."""
        out: dict[tuple[str, str], dict[str, float]] = {}
        for worker, snap in self._snapshots():
            for device, c in (snap.get("devices") or {}).items():
                into = out.setdefault((device, worker), {})
                for k, v in c.items():
                    into[k] = into.get(k, 0) + v
        return [(device, worker, c) for (device, worker), c in sorted(out.items())]

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, snap in self._snapshots():
            for k, v in (snap.get("stats") or {}).items():
                out[k] = out.get(k, 0) + int(v)
        return out


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


class RunMonitor:
    """Figures of one run (local engine) for the journal, the metrics endpoint and the progress line."""

    def __init__(
        self,
        progress_dir: str,
        *,
        chunks_total: int,
        chunks_done_before: int,
        lines_total: int,
        interval: float = 5.0,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.progress_dir = progress_dir
        self.run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.chunks_total = chunks_total
        self.chunks_done_before = chunks_done_before
        self.lines_total = lines_total
        self.interval = interval
        self.info = dict(info or {})
        self.backend: Backend | None = None
        self.progress: Progress | None = None
        # Engines that embed in other processes (--devices, --engine ray) keep their own progress; the driver's
        # Summary, updated as each chunk comes back, is then the source (no per-endpoint figures).
        self.summary: Any = None
        # ...and what their backends report with each chunk (per endpoint, per device): see WorkerFigures
        self.workers: WorkerFigures | None = None
        self.texts_sent = 0
        self.rejects: Counter[str] = Counter()
        self._chunk_seconds: list[float] = []
        self._chunk_started: dict[str, float] = {}
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_rows = 0
        self._last_t = self._start
        self._last_inputs: dict[str, int] = {}
        self._last_latency: dict[str, list[int]] = {}  # per endpoint: histogram counts at the last line
        self._last_device: dict[
            str, tuple[float, float]
        ] = {}  # per worker: texts and seconds at the last line
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._remote = storage.is_uri(progress_dir)
        self._buffer: list[bytes] = []
        self._last_flush = 0.0
        self.last_line: dict[str, Any] | None = None

    # ------------------------------------------------------------------ fed by the runner

    def chunk_started(self, name: str) -> None:
        with self._lock:
            self._chunk_started.setdefault(name, time.monotonic())

    def chunk_done(self, name: str, texts_sent: int, reject_reasons: Iterable[str]) -> None:
        now = time.monotonic()
        with self._lock:
            t0 = self._chunk_started.pop(name, None)
            if t0 is not None:
                self._chunk_seconds.append(round(now - t0, 3))
            self.texts_sent += texts_sent
            self.rejects.update(reject_kind(r) for r in reject_reasons)

    def report(self, key: str, worker: str, snapshot: dict[str, Any]) -> None:
        """A worker's cumulative ``Backend.telemetry`` (engines that embed in other processes)."""
        if self.workers is None:
            self.workers = WorkerFigures()
        self.workers.update(key, worker, snapshot)

    # ------------------------------------------------------------------ read by the line, journal, metrics

    def note(self) -> str | None:
        """The progress line's extra field: the waiting note while no server answers."""
        backend = self.backend
        return backend.waiting_note(after=min(5.0, self.interval)) if backend is not None else None

    def rows(self) -> int:
        if self.progress is not None:
            return self.progress.processed
        return int(self.summary.rows) if self.summary is not None else 0

    def chunks_done(self) -> int:
        if self.progress is not None:
            return self.chunks_done_before + self.progress.chunks
        return self.chunks_done_before + (
            int(self.summary.chunks_done_now) if self.summary is not None else 0
        )

    def sent(self) -> int:
        if self.progress is None and self.summary is not None:
            return int(self.summary.embedded_texts)
        return self.texts_sent

    def distinct_and_reused(self) -> tuple[int, int]:
        """Distinct texts among the run's rows (0 with --no-dedupe) and rows whose vector came from --reuse."""
        if self.summary is None:
            return 0, 0
        return int(getattr(self.summary, "distinct_texts", 0)), int(getattr(self.summary, "reused", 0))

    def retries(self) -> dict[str, int]:
        if self.backend is not None:
            stats = self.backend.stats()
        elif self.workers is not None and self.workers.reported():
            stats = self.workers.stats()
        elif self.summary is not None:
            stats = {}
            for _ in range(5):  # the engine's thread may add a key while we copy
                try:
                    stats = dict(self.summary.stats)
                    break
                except RuntimeError:
                    continue
        else:
            stats = {}
        return {k[len("retry_") :]: v for k, v in stats.items() if k.startswith("retry_")}

    def eta_seconds(self) -> float | None:
        p = self.progress
        if p is None:
            if self.summary is None or not self.lines_total:
                return None
            elapsed = time.monotonic() - self._start
            done = self.chunks_done() - self.chunks_done_before
            left = self.chunks_total - self.chunks_done()
            return left * elapsed / done if done > 0 else None
        elapsed = time.monotonic() - p.start
        avg = p.processed / elapsed if elapsed > 0 else 0.0
        remaining = max(0, p.total_rows - p.lines_done)
        return remaining / avg if avg > 0 else None

    def avg_docs_per_s(self) -> float:
        elapsed = time.monotonic() - self._start
        return self.rows() / elapsed if elapsed > 0 else 0.0

    def waiting_seconds(self) -> float:
        backend = self.backend
        pool = getattr(backend, "pool", None)
        return float(pool.waiting_for()) if pool is not None else 0.0

    def endpoints(self) -> list[Any]:
        return self.backend.endpoints() if self.backend is not None else []

    def endpoint_figures(self) -> dict[str, dict[str, Any]]:
        """Per endpoint (host:port) the cumulative counters of ``Endpoint.snapshot``: this process's pool, or
        the sum of what the workers reported."""
        if self.backend is not None:
            out: dict[str, dict[str, Any]] = {}
            for e in self.backend.endpoints():
                out[e.host] = merge_endpoint(out.get(e.host), e.snapshot())
            return out
        return self.workers.endpoints() if self.workers is not None else {}

    def device_figures(self) -> list[tuple[str, str, dict[str, float]]]:
        """``(device, worker, counters)`` of the in-process model: this process's (worker = device), or what
        each worker reported (worker = its label: ``cuda:0#1`` under --devices, ``host:pid`` on Ray)."""
        if self.backend is not None:
            return [(d, d, c) for d, c in sorted(self.backend.device_counters().items())]
        return self.workers.devices() if self.workers is not None else []

    def interval_line(self) -> dict[str, Any]:
        """One journal line: cumulative counts and this interval's rates and latencies."""
        now = time.monotonic()
        rows = self.rows()
        dt = now - self._last_t
        rate = (rows - self._last_rows) / dt if dt > 0 else 0.0
        self._last_rows, self._last_t = rows, now
        eps: dict[str, Any] = {}
        if self.backend is not None:  # this process's pool: the interval's exact latencies
            for e in self.endpoints():
                lat = sorted(e.take_recent_latencies())
                eps[e.host] = self._endpoint_line(
                    e.host, e.snapshot(), dt, _quantile(lat, 0.5), _quantile(lat, 0.95)
                )
        else:  # workers' reports: quantiles from the interval's histogram counts
            for host, snap in self.endpoint_figures().items():
                counts = list(snap["latency_counts"])
                before = self._last_latency.get(host, [0] * len(counts))
                delta = [a - b for a, b in zip(counts, before, strict=True)]
                self._last_latency[host] = counts
                eps[host] = self._endpoint_line(
                    host, snap, dt, _bucket_quantile(delta, 0.5), _bucket_quantile(delta, 0.95)
                )
        devices: dict[str, Any] = {}
        for device, worker, c in self.device_figures():
            texts0, secs0 = self._last_device.get(worker, (0.0, 0.0))
            self._last_device[worker] = (c["texts"], c["seconds"])
            devices[worker] = {
                **({"device": device} if device != worker else {}),
                "batches": int(c["batches"]),
                "texts": int(c["texts"]),
                "tokens": int(c["tokens"]),
                "padded_tokens": int(c["padded_tokens"]),
                "seconds": round(c["seconds"], 3),
                "docs_per_s": round((c["texts"] - texts0) / dt, 2) if dt > 0 else 0.0,
                # share of the interval the device was computing (above 1: workers sharing it overlap)
                "busy": round((c["seconds"] - secs0) / dt, 3) if dt > 0 else 0.0,
            }
        with self._lock:
            chunk_seconds, self._chunk_seconds = self._chunk_seconds, []
            rejects = dict(self.rejects)
        texts_sent = self.sent()
        eta = self.eta_seconds()
        waiting = self.note()
        return {
            "event": "interval",
            "run": self.run_id,
            "t": round(time.time(), 3),
            "elapsed": round(now - self._start, 3),
            "rows": rows,
            "texts_sent": texts_sent,
            "distinct_texts": self.distinct_and_reused()[0],
            "reused": self.distinct_and_reused()[1],
            "rejects": rejects,
            "retries": self.retries(),
            "chunks_done": self.chunks_done(),
            "chunks_total": self.chunks_total,
            "docs_per_s": round(rate, 2),
            "avg_docs_per_s": round(self.avg_docs_per_s(), 2),
            "eta_s": round(eta, 1) if eta is not None else None,
            "waiting_s": round(self.waiting_seconds(), 1),
            "waiting": waiting,
            "endpoints": eps,
            "devices": devices,
            "chunk_seconds": chunk_seconds,
        }

    def _endpoint_line(
        self, host: str, snap: dict[str, Any], dt: float, p50: float | None, p95: float | None
    ) -> dict[str, Any]:
        inputs = int(snap["inputs"])
        line = {
            "requests": snap["requests"],
            "errors": snap["errors"],
            "inputs": inputs,
            "docs_per_s": round((inputs - self._last_inputs.get(host, 0)) / dt, 2) if dt > 0 else 0.0,
            "in_flight": snap["in_flight"],
            "resting": snap["resting"],
            "p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
            "p95_ms": round(p95 * 1000, 2) if p95 is not None else None,
        }
        self._last_inputs[host] = inputs
        return line

    # ------------------------------------------------------------------ the journal

    def _write(self, obj: dict[str, Any], force: bool = False) -> None:
        line = orjson.dumps(obj) + b"\n"
        try:
            if not self._remote:
                with open(journal_path(self.progress_dir), "ab") as f:
                    f.write(line)
                return
            self._buffer.append(line)
            now = time.monotonic()
            if force or now - self._last_flush >= REMOTE_FLUSH_SECONDS:
                path = journal_path(self.progress_dir)
                if self._last_flush == 0.0:  # first flush: keep the earlier runs' lines
                    self._buffer.insert(0, storage.read_bytes(path) or b"")
                storage.write_bytes(path, b"".join(self._buffer))
                self._buffer = [b"".join(self._buffer)]
                self._last_flush = now
        except OSError as exc:  # the journal is an aid: never stop a run for it
            log.warning("cannot write the run journal: %s", exc)

    def start(self) -> RunMonitor:
        self._write(
            {
                "event": "start",
                "run": self.run_id,
                "t": round(time.time(), 3),
                "interval": self.interval,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "chunks_total": self.chunks_total,
                "chunks_done": self.chunks_done_before,
                "lines_total": self.lines_total,
                **self.info,
            }
        )
        self._thread = threading.Thread(target=self._loop, name="run-journal", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._tick()

    def _tick(self) -> None:
        try:
            line = self.interval_line()
        except RuntimeError:  # a dict changed size under us (read from another thread): next interval
            return
        self.last_line = line
        self._write(line)

    def stop(self, summary: dict[str, Any] | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._tick()  # the last partial interval
            end = {"event": "end", "run": self.run_id, "t": round(time.time(), 3), **(summary or {})}
            self._write(end, force=True)


def waiting_from_journal(progress_dir: str, now: float | None = None) -> str | None:
    """For ``status``: the running run's waiting note, if its latest journal line (recent) has one."""
    lines = read_journal(progress_dir)
    if not lines:
        return None
    last = lines[-1]
    if last.get("event") != "interval" or not last.get("waiting"):
        return None
    start: dict[str, Any] = next(
        (x for x in reversed(lines) if x.get("event") == "start" and x.get("run") == last.get("run")), {}
    )
    interval = float(start.get("interval") or 5.0)
    now = time.time() if now is None else now
    if now - float(last.get("t", 0)) > 3 * interval + 5:
        return None  # that run is gone (killed): its note is stale
    return str(last["waiting"])
