"""``tweet-embed report``: where a run's time went, as one self-contained HTML file and a PNG of the main chart.

Everything comes from the work dir: the run journal (``events.jsonl``, see :mod:`.telemetry`) and the last
``plan``'s estimate (``estimate.json``).  The charts are PNGs drawn with matplotlib and inlined as base64, so
the page needs no network when it is opened; the figures behind them are also inlined as JSON
(``<script type="application/json" id="report-data">``) so they can be checked or reused.

Charts: throughput over time stacked by endpoint (or by device of the in-process model, with each device's
busy share), latency p50/p95 per endpoint,
retries and resting endpoints over time, rejects by reason, chunk durations, and the estimate beside the
actual time.  Time runs across resumes on one axis (seconds since the first run started; the gap between
runs shows as a gap).
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter, defaultdict
from typing import Any

import orjson

from tweet_embed.embed.estimate import read_estimate
from tweet_embed.embed.telemetry import read_journal

__all__ = ["MissingDependency", "report_data", "write_report"]


class MissingDependency(RuntimeError):
    """matplotlib is not installed (it is the ``report`` extra)."""


def report_data(progress_dir: str) -> dict[str, Any]:
    """The figures of every run in the journal, ready to chart (and checked by the tests)."""
    events = read_journal(progress_dir)
    starts = [e for e in events if e.get("event") == "start"]
    if not starts:
        raise FileNotFoundError(
            f"no run journal in {progress_dir} (events.jsonl): run `tweet-embed embed` first"
        )
    t0 = float(starts[0]["t"])
    runs: list[dict[str, Any]] = []
    by_run: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_run[str(e.get("run"))].append(e)
    rejects: Counter[str] = Counter()
    chunk_seconds: list[float] = []
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    lat50: dict[str, list[tuple[float, float]]] = defaultdict(list)
    lat95: dict[str, list[tuple[float, float]]] = defaultdict(list)
    busy: dict[str, list[tuple[float, float]]] = defaultdict(list)  # device seconds per second, per device
    retries_t: list[tuple[float, float]] = []
    resting_t: list[tuple[float, int]] = []
    totals = {"rows": 0, "texts_sent": 0, "seconds": 0.0}
    for s in starts:
        lines = by_run[str(s["run"])]
        iv = [e for e in lines if e.get("event") == "interval"]
        end = next((e for e in lines if e.get("event") == "end"), None)
        last = iv[-1] if iv else {}
        t_end = float(end["t"]) if end else float(last.get("t", s["t"]))
        rows = int(end["rows"]) if end else int(last.get("rows", 0))
        sent = int(end["texts_sent"]) if end else int(last.get("texts_sent", 0))
        runs.append(
            {
                "run": s["run"],
                "start": round(float(s["t"]) - t0, 3),
                "seconds": round(t_end - float(s["t"]), 3),
                "rows": rows,
                "texts_sent": sent,
                "ended": end is not None,
                "chunks_done_before": s.get("chunks_done"),
            }
        )
        totals["rows"] += rows
        totals["texts_sent"] += sent
        totals["seconds"] += t_end - float(s["t"])
        rejects.update(last.get("rejects", {}))
        prev_retries = 0
        for e in iv:
            x = round(float(e["t"]) - t0, 3)
            eps = e.get("endpoints") or {}
            if eps:
                for host, ep in eps.items():
                    series[host].append((x, float(ep.get("docs_per_s") or 0.0)))
                    if ep.get("p50_ms") is not None:
                        lat50[host].append((x, float(ep["p50_ms"])))
                        lat95[host].append((x, float(ep["p95_ms"])))
            elif e.get("devices"):  # the in-process model: by device (or device worker)
                for worker, dev in e["devices"].items():
                    series[worker].append((x, float(dev.get("docs_per_s") or 0.0)))
                    busy[worker].append((x, float(dev.get("busy") or 0.0)))
            else:
                series["in-process model"].append((x, float(e.get("docs_per_s") or 0.0)))
            r = sum((e.get("retries") or {}).values())
            retries_t.append((x, r - prev_retries))
            prev_retries = r
            resting_t.append((x, sum(1 for ep in eps.values() if ep.get("resting"))))
            chunk_seconds.extend(float(c) for c in e.get("chunk_seconds") or [])
    chunks_total = int(starts[-1].get("chunks_total") or 0)
    estimate = read_estimate(progress_dir)
    est = None
    if estimate is not None:
        est = {
            "estimated_seconds": estimate.get("estimated_seconds"),
            "docs_per_s": (estimate.get("calibration") or {}).get("docs_per_s"),
            "valid_rows": estimate.get("valid_rows"),
            "texts_to_send": estimate.get("texts_to_send"),
        }
    secs = totals["seconds"]
    return {
        "runs": runs,
        "rows": totals["rows"],
        "texts_sent": totals["texts_sent"],
        "seconds": round(secs, 3),
        "docs_per_s": round(totals["rows"] / secs, 2) if secs > 0 else None,
        "chunks_total": chunks_total,
        "chunks_timed": len(chunk_seconds),
        "rejects": dict(sorted(rejects.items())),
        "chunk_seconds": chunk_seconds,
        "throughput": {k: v for k, v in series.items()},
        "latency_p50_ms": dict(lat50),
        "latency_p95_ms": dict(lat95),
        "device_busy": dict(busy),
        "retries": retries_t,
        "resting": resting_t,
        "estimate": est,
    }


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _charts(d: dict[str, Any]) -> list[tuple[str, bytes]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependency(
            "tweet-embed report draws its charts with matplotlib: pip install 'tweet-embed[report]' "
            "(or pip install matplotlib)"
        ) from exc
    out: list[tuple[str, bytes]] = []

    fig, ax = plt.subplots(figsize=(10, 4))
    names = sorted(d["throughput"])
    if names:
        xs = sorted({x for n in names for x, _ in d["throughput"][n]})
        ys = [[dict(d["throughput"][n]).get(x, 0.0) for x in xs] for n in names]
        ax.stackplot(xs, ys, labels=names, step="pre")  # a rate is that of the interval ending at x
        ax.legend(loc="upper left", fontsize=8)
    by = "endpoint" if d["latency_p50_ms"] or not d["device_busy"] else "device"
    ax.set(title=f"Throughput by {by} (docs/s, stacked)", xlabel="seconds since the first run started")
    out.append(("throughput", _png(fig)))
    plt.close(fig)

    if d["device_busy"]:
        fig, ax = plt.subplots(figsize=(10, 3))
        for worker, pts in sorted(d["device_busy"].items()):
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=worker)
        ax.legend(fontsize=8)
        ax.set(title="Device busy (device seconds per second)", xlabel="seconds")
        out.append(("device_busy", _png(fig)))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3.5))
    for host in sorted(d["latency_p50_ms"]):
        p50, p95 = d["latency_p50_ms"][host], d["latency_p95_ms"][host]
        (line,) = ax.plot([x for x, _ in p50], [y for _, y in p50], label=f"{host} p50")
        ax.plot([x for x, _ in p95], [y for _, y in p95], "--", color=line.get_color(), label=f"{host} p95")
    if d["latency_p50_ms"]:
        ax.legend(fontsize=8)
    ax.set(title="Request latency per endpoint (ms)", xlabel="seconds")
    out.append(("latency", _png(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3))
    ax.bar(
        [x for x, _ in d["retries"]], [y for _, y in d["retries"]], width=1.0, label="retries in the interval"
    )
    ax.plot(
        [x for x, _ in d["resting"]], [y for _, y in d["resting"]], color="red", label="endpoints resting"
    )
    ax.legend(fontsize=8)
    ax.set(title="Retries and resting endpoints", xlabel="seconds")
    out.append(("retries", _png(fig)))
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3))
    rej = d["rejects"]
    a1.barh(list(rej) or ["none"], list(rej.values()) or [0])
    a1.set(title="Rejects by reason")
    a2.hist(d["chunk_seconds"] or [0], bins=min(30, max(1, len(d["chunk_seconds"]))))
    a2.set(title="Chunk durations (s)", xlabel="seconds", ylabel="chunks")
    out.append(("rejects_chunks", _png(fig)))
    plt.close(fig)

    if d["estimate"] and d["estimate"].get("estimated_seconds"):
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.barh(["plan's estimate", "actual"], [d["estimate"]["estimated_seconds"], d["seconds"]])
        ax.set(title="Time: estimate and actual (s)")
        out.append(("estimate", _png(fig)))
        plt.close(fig)
    return out


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def write_report(progress_dir: str, out_html: str, out_png: str | None = None) -> dict[str, Any]:
    """Write the HTML report (and the main chart as a PNG); returns the figures it shows."""
    d = report_data(progress_dir)
    charts = _charts(d)
    est = d["estimate"] or {}
    summary = [
        ("runs", f"{len(d['runs'])} ({sum(1 for r in d['runs'] if not r['ended'])} without an end: killed?)"),
        ("rows", f"{d['rows']:,}"),
        ("texts sent", f"{d['texts_sent']:,}"),
        ("time embedding", f"{d['seconds']:,.1f} s"),
        ("average", f"{d['docs_per_s'] or 0:,.1f} docs/s"),
        ("chunks", f"{d['chunks_timed']:,} timed of {d['chunks_total']:,}"),
        ("rejects", ", ".join(f"{k}: {v:,}" for k, v in d["rejects"].items()) or "none"),
        (
            "plan's estimate",
            f"{est['estimated_seconds']:,.1f} s at {est['docs_per_s']:,.1f} docs/s"
            if est.get("estimated_seconds")
            else "none (run `tweet-embed plan` with the same --work-dir)",
        ),
    ]
    runs = [
        (
            r["run"],
            f"+{r['start']:.0f} s, {r['seconds']:.1f} s, {r['rows']:,} rows"
            + ("" if r["ended"] else ", no end"),
        )
        for r in d["runs"]
    ]
    imgs = "".join(
        f'<h2>{html.escape(name.replace("_", " "))}</h2><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}">'
        for name, png in charts
    )
    data = orjson.dumps(d).decode().replace("</", "<\\/")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tweet-embed report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{text-align:left;padding:2px 12px;border-bottom:1px solid #ddd}}img{{max-width:100%}}</style></head>
<body><h1>tweet-embed report</h1>
<p>Work dir progress: {html.escape(progress_dir)}</p>
{_table(summary)}
<h2>runs</h2>{_table(runs)}
{imgs}
<script type="application/json" id="report-data">{data}</script>
</body></html>
"""
    with open(out_html, "w", encoding="utf-8") as f:
        f.write(page)
    if out_png is not None:
        with open(out_png, "wb") as f:
            f.write(charts[0][1])
    return d
