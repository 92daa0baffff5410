"""``tweet-embed status``: what a run in a work dir has done, read from its plan and markers only."""

from __future__ import annotations

from tweet_embed import storage
from tweet_embed.embed.chunks import Marker, Plan, WorkDirs, done_markers
from tweet_embed.embed.telemetry import waiting_from_journal
from tweet_embed.progress import fmt_eta


def _unit(kind: str) -> str:
    return {"json": "records", "csv": "rows", "tsv": "rows", "parquet": "rows"}.get(kind, "lines")


def run_status(dirs: WorkDirs) -> tuple[str, int]:
    """Return (report, exit code): 0 when complete, 1 when chunks remain, 2 when there is no run."""
    data = storage.read_bytes(dirs.plan_path)
    if data is None:
        return f"no run in {dirs.progress} (no plan.json)", 2
    plan = Plan.from_json(data)
    markers = done_markers(dirs)
    names = {c.name for c in plan.chunks}
    done = [m for n, m in markers.items() if n in names]
    rows = sum(m.rows for m in done)
    rejects = sum(m.rejects for m in done)
    lines_done = sum(m.n_lines for m in done)
    total_lines = sum(c.n_lines for c in plan.chunks)
    skipped: dict[str, int] = {}
    for m in done:
        for reason, n in m.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    lines = [
        "inputs: " + ", ".join(f"{f.label} ({f.lines} {_unit(f.kind)})" for f in plan.files),
        f"chunks: {len(done)} / {len(plan.chunks)} done",
        f"rows embedded: {rows}, rejected: {rejects}"
        + (
            f", skipped by filters: {sum(skipped.values())} ("
            + ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
            + ")"
            if skipped
            else ""
        ),
    ]
    # speed from the markers' times: the most recent stretch of work, robust to pauses between runs
    times = sorted(
        storage.parallel_map(
            storage.mtime,
            [dirs.marker_path(c) for c in plan.chunks if c.name in markers],
            storage.is_uri(dirs.progress),
        )
    )
    if len(times) >= 2 and len(done) < len(plan.chunks):
        recent = times[-min(len(times), 50) :]
        span = recent[-1] - recent[0]
        per_chunk_lines = lines_done / len(done)
        if span > 0:
            rate = (len(recent) - 1) * per_chunk_lines / span
            lines.append(
                f"recent speed: {rate:.1f} lines/s, ETA: {fmt_eta((total_lines - lines_done) / rate)}"
            )
    waiting = waiting_from_journal(dirs.progress)
    if waiting:
        lines.append(waiting)
    texts = _texts_line(dirs, done)
    if texts:
        lines.append(texts)
    for f in plan.files:
        if f.damaged:
            lines.append(f"damaged: {f.damaged}")
    complete = len(done) == len(plan.chunks)
    lines.append("complete" if complete else "incomplete: re-run the embed command to resume")
    return "\n".join(lines), 0 if complete else 1


def _texts_line(dirs: WorkDirs, done: list[Marker]) -> str | None:
    """Distinct texts (from the dedupe plan), texts sent and vectors reused so far; None without dedupe."""
    import os

    import orjson

    for base in (dirs.progress, dirs.tmp):
        data = storage.read_bytes(os.path.join(base, "dedupe", "index.json"))
        if data is not None:
            index = orjson.loads(data)
            return (
                f"texts: {index['rows']} rows, {index['distinct_texts']} distinct; "
                f"sent: {sum(m.embedded_texts for m in done)}, reused from earlier runs: "
                f"{sum(m.reused for m in done)}"
            )
    return None
