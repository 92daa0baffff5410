"""The run loop (local engine): plan → skip finished chunks → read, embed, write in a pipeline → summary.

Reading/parsing runs in a thread one chunk ahead, several chunks are embedded at once so the servers never
idle while a shard is written, and writing runs in threads (pyarrow releases the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from tweet_embed import storage
from tweet_embed._version import __version__
from tweet_embed.backends import BackendSpec
from tweet_embed.backends.base import Backend
from tweet_embed.embed.chunks import (
    REJECTS_DIR,
    Chunk,
    Marker,
    Plan,
    PlanError,
    WorkDirs,
    WorkLock,
    check_manifest,
    check_manifest_option,
    done_markers,
    finished_chunks,
    load_or_create_plan,
    manifest_key,
    record_in_manifest,
)
from tweet_embed.embed.options import EmbedOptions, Summary, chunk_options, output_options
from tweet_embed.embed.telemetry import RunMonitor, WorkerFigures
from tweet_embed.embed.worker import ChunkResult, commit_chunk, embed_chunk, parse_chunks, run_pipeline
from tweet_embed.input.records import InputError, ParsedBlock
from tweet_embed.input.rules import rules_metadata
from tweet_embed.progress import Progress

if TYPE_CHECKING:
    from tweet_embed.embed.metrics import MetricsServer

log = logging.getLogger("tweet_embed")
WRITE_QUEUE = 3  # finished chunks being written at once (writer threads)


def check_columns(plan: Plan, opts: EmbedOptions) -> None:
    """Parquet and CSV input: fail at once, naming the columns present, when the id or text column is
    missing."""
    from tweet_embed.input.csv import column_index
    from tweet_embed.input.parquet import check_parquet_columns

    for f in plan.files:
        if f.kind == "parquet":
            check_parquet_columns(f.path, opts.id_field, opts.text_field)
        elif f.header is not None:
            column_index(f.header, opts.id_field, f.label)
            column_index(f.header, opts.text_field, f.label)


def merge_rejects(dirs: WorkDirs, plan: Plan) -> str | None:
    """Rebuild ``rejects.jsonl`` from the per-chunk files, in input order (identical after any resume)."""
    present = set(storage.list_names(os.path.join(dirs.progress, REJECTS_DIR)))
    paths = [dirs.rejects_path(c) for c in plan.chunks if c.name + ".jsonl" in present]
    parts = [b for b in storage.parallel_map(storage.read_bytes, paths, storage.is_uri(dirs.progress)) if b]
    target = dirs.merged_rejects_path
    if not parts:
        storage.delete(target)
        return None
    storage.write_bytes(target, b"".join(parts))
    return target


async def run_embed_async(opts: EmbedOptions, make_backend: Callable[[], Backend] | BackendSpec) -> Summary:
    """Plan, skip finished chunks, embed the rest. ``make_backend`` is a factory or a picklable spec
    (a spec is needed for several devices, whose worker processes build their own backends)."""
    dirs = opts.dirs
    t0 = time.monotonic()
    summary = Summary(shards_dir=dirs.shards)
    dirs.create()
    with WorkLock(dirs.progress):
        if opts.restart:
            dirs.reset()
        cleaned = dirs.clean_tmp()
        if cleaned:
            log.info("removed %d leftover staging files of an earlier run", cleaned)
        plan, reused = await asyncio.to_thread(
            load_or_create_plan, dirs, opts.inputs, opts.chunk_lines, opts.input_format
        )
        markers = done_markers(dirs)
        done = finished_chunks(dirs, plan, markers)
        pending = [c for c in plan.chunks if c.name not in done]
        if pending:
            check_columns(plan, opts)  # before a model loads for minutes
        if opts.max_chunks is not None:
            pending = pending[: opts.max_chunks]
        summary.chunks_total = len(plan.chunks)
        summary.chunks_skipped = len(done)
        damaged = [f.damaged for f in plan.files if f.damaged]
        if reused and done:
            log.info("resuming: %d of %d chunks already done", len(done), len(plan.chunks))
        if opts.reuse and not opts.dedupe:
            raise PlanError("--reuse needs dedupe (it is on unless --no-dedupe is given)")
        if pending and opts.dedupe:
            await asyncio.to_thread(_plan_dedupe, opts, plan, summary)
        if pending and opts.ray is not None:
            from tweet_embed.embed.engines.ray import run_on_ray

            with _driver_monitor(opts, plan, pending, summary, "ray") as monitor:
                await run_on_ray(opts, make_backend, plan, pending, summary, on_telemetry=monitor.report)
        elif pending and opts.devices and len(opts.devices) > 1:
            spec = make_backend
            if not isinstance(spec, BackendSpec):
                raise TypeError("several devices need a BackendSpec, not a backend factory")
            from tweet_embed.embed.engines.devices import run_on_devices

            job = {
                "id_field": opts.id_field,
                "text_field": opts.text_field,
                "dedupe": opts.dedupe_files,
                "rules": opts.rules,
            }
            out = output_options(opts, None)
            with _driver_monitor(opts, plan, pending, summary, "devices") as monitor:
                await asyncio.to_thread(
                    run_on_devices,
                    opts.devices,
                    spec,
                    plan,
                    pending,
                    dirs,
                    job,
                    out,
                    __version__,
                    summary,
                    opts.log_interval,
                    monitor.report,
                )
        elif pending:
            factory = make_backend.build if isinstance(make_backend, BackendSpec) else make_backend
            await _run_pending(opts, plan, pending, factory, summary)
        else:
            log.info("all %d chunks are already done; nothing to send", len(plan.chunks))
        all_markers = done_markers(dirs).values()
        for m in all_markers:
            summary.rejected += m.rejects
            for reason, n in m.skipped.items():
                summary.skipped[reason] = summary.skipped.get(reason, 0) + n
        if opts.dedupe_files is not None:
            record_in_manifest(dirs, "texts", texts_report(all_markers, summary, len(plan.chunks)))
        summary.rejects_file = merge_rejects(dirs, plan)
        summary.elapsed = time.monotonic() - t0
        if damaged:
            summary.errors.extend(damaged)
    return summary


@contextlib.contextmanager
def _driver_monitor(
    opts: EmbedOptions, plan: Plan, pending: list[Chunk], summary: Summary, engine: str
) -> Iterator[RunMonitor]:
    """Journal and metrics for the engines that embed in other processes (--devices, --engine ray): the
    driver's figures (rows, texts, chunks, ETA) and the per-endpoint and per-device figures the workers
    report (``monitor.report``, see :class:`~tweet_embed.embed.telemetry.WorkerFigures`)."""
    monitor, metrics = _open_monitor(opts, plan, pending, summary, engine)
    monitor.workers = WorkerFigures()
    monitor.start()
    try:
        yield monitor
    finally:
        _close_monitor(monitor, metrics, summary, dict(summary.stats))


def _open_monitor(
    opts: EmbedOptions, plan: Plan, pending: list[Chunk], summary: Summary, engine: str
) -> tuple[RunMonitor, MetricsServer | None]:
    """The run's journal (not started yet) and, with --metrics-port, its /metrics server."""
    monitor = RunMonitor(
        opts.dirs.progress,
        chunks_total=len(plan.chunks),
        chunks_done_before=summary.chunks_skipped,
        lines_total=sum(c.n_lines for c in plan.chunks),
        interval=opts.log_interval,
        info={"engine": engine, "inputs": [f.label for f in plan.files], "chunks_pending": len(pending)},
    )
    monitor.summary = summary  # distinct texts and reused rows (dedupe) for the journal and /metrics
    metrics = None
    if opts.metrics_port is not None:
        from tweet_embed.embed.metrics import MetricsServer

        metrics = MetricsServer(monitor, opts.metrics_port, opts.metrics_addr)
        log.info("metrics: %s", metrics.url)
    return monitor, metrics


def _close_monitor(
    monitor: RunMonitor, metrics: MetricsServer | None, summary: Summary, stats: dict[str, int]
) -> None:
    """The journal's ``end`` event (the run's figures, ``stats`` the backend's), then /metrics closes."""
    monitor.stop(
        {
            "rows": summary.rows,
            "texts_sent": summary.embedded_texts,
            "chunks_done_now": summary.chunks_done_now,
            "distinct_texts": summary.distinct_texts,
            "reused": summary.reused,
            "stats": stats,
        }
    )
    if metrics is not None:
        metrics.close()


def texts_report(markers: Iterable[Marker], summary: Summary, chunks: int) -> dict[str, object]:
    """Rows, distinct texts, texts sent and vectors reused, over every finished chunk of the run."""
    ms = list(markers)
    return {
        "rows_planned": summary.planned_rows,
        "distinct_texts": summary.distinct_texts,
        "chunks_done": len(ms),
        "chunks": chunks,
        "rows_written": sum(m.rows for m in ms),
        "texts_sent": sum(m.embedded_texts for m in ms),
        "vectors_reused": sum(m.reused for m in ms),
    }


def _plan_dedupe(opts: EmbedOptions, plan: Plan, summary: Summary) -> None:
    """The run's dedupe map (planned once; a resume loads it), set on ``opts`` for the engines."""
    from tweet_embed.embed.dedupe_plan import dedupe_root, map_out_of_reach, plan_dedupe

    dirs = opts.dirs
    if map_out_of_reach(dirs, opts.ray):
        log.warning(
            "--engine ray with an object-store work dir: texts are deduplicated inside each chunk only"
        )
        return
    check_manifest_option(dirs, "dedupe", True)
    check_manifest_option(dirs, "reuse", list(opts.reuse))
    files, index = plan_dedupe(plan, dedupe_root(dirs), chunk_options(opts), opts.reuse)
    opts.dedupe_files = files
    summary.distinct_texts = int(index["distinct_texts"])
    summary.planned_rows = int(index["rows"])


async def _run_pending(
    opts: EmbedOptions,
    plan: Plan,
    pending: list[Chunk],
    make_backend: Callable[[], Backend],
    summary: Summary,
) -> None:
    dirs = opts.dirs
    monitor, metrics = _open_monitor(opts, plan, pending, summary, "local")
    backend = make_backend()
    monitor.backend = backend
    total = sum(c.n_lines for c in pending)
    progress = Progress(total_rows=total, interval=opts.log_interval, note=monitor.note)
    monitor.progress = progress
    # Progress and the journal start before the backend does: waiting for a server that does not answer
    # (at start too) shows in the 5-second line, the journal and `status`.
    monitor.start()
    try:
        with progress:
            info = await backend.start()
            summary.model, summary.dim = info.model, info.dim
            key = manifest_key(plan, info.model, info.dim, output_options(opts, info))
            check_manifest(dirs, key)
            metadata = {**info.metadata(), "version": __version__, **rules_metadata(opts.rules)}
            limiter = asyncio.Semaphore(max(1, info.max_in_flight))
            copts = chunk_options(opts)
            gen = parse_chunks(plan, pending, copts)

            async def embed(chunk: Chunk, block: ParsedBlock) -> ChunkResult:
                label = plan.files[chunk.file_index].label
                monitor.chunk_started(chunk.name)
                return await embed_chunk(
                    backend, chunk, block, info, copts, limiter=limiter, file_label=label
                )

            def commit(chunk: Chunk, result: ChunkResult) -> Marker:
                marker = commit_chunk(dirs, chunk, result, metadata)
                monitor.chunk_done(chunk.name, result.embedded_texts, (r.reason for r in result.rejects))
                return marker

            def done(chunk: Chunk, marker: Marker) -> None:
                summary.rows += marker.rows
                summary.embedded_texts += marker.embedded_texts
                summary.reused += marker.reused
                summary.chunks_done_now += 1
                progress.add(marker.rows, chunk.n_lines)

            await run_pipeline(
                lambda: next(gen, None),
                embed,
                commit,
                done,
                chunks_in_flight=opts.chunks_in_flight,
                writes_in_flight=WRITE_QUEUE,
            )
        summary.stats = backend.stats()
    finally:
        _close_monitor(monitor, metrics, summary, backend.stats())
        with contextlib.suppress(Exception):
            await backend.close()


def run_embed(opts: EmbedOptions, make_backend: Callable[[], Backend] | BackendSpec) -> Summary:
    """Run (or resume) an embed job to completion; raises PlanError / InputError / BackendError."""
    return asyncio.run(run_embed_async(opts, make_backend))


__all__ = ["EmbedOptions", "Summary", "run_embed", "run_embed_async", "PlanError", "InputError"]
