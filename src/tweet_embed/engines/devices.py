"""Several GPUs on one machine: one worker process per device, each taking whole chunks.

The parent keeps what must be single (the lock, the plan, the manifest check, reading compressed input once,
sequentially) and hands chunks to a bounded queue; each worker builds its own backend from a picklable
:class:`~tweet_embed.backends.BackendSpec` on its device, embeds, and commits its chunks with the same
``worker.commit_chunk`` (shard, rejects, marker) as every other engine. Errors in a worker travel back as
messages; a worker that dies without a word is noticed by its exit code: the parent never waits forever.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import queue
import threading
import traceback
from collections.abc import Iterator
from typing import Any

from ..backends import BackendSpec
from ..backends.base import BackendError
from ..chunks import Chunk, Plan, WorkDirs, check_manifest, iter_chunk_bytes, manifest_key
from ..progress import Progress
from ..records import parse_lines

log = logging.getLogger("tweet_embed")
POLL = 0.5  # seconds between liveness checks while waiting on a queue


class WorkerDied(BackendError):
    """A device worker exited or raised; the message carries its device and traceback or exit code."""


def _payloads(plan: Plan, pending: list[Chunk]) -> Iterator[tuple[Chunk, bytes | None]]:
    """JSONL chunks with their bytes (read once, sequentially, here); Parquet chunks by reference."""
    jsonl = [c for c in pending if plan.files[c.file_index].kind == "jsonl"]
    for c in pending:
        if plan.files[c.file_index].kind != "jsonl":
            yield c, None
    yield from iter_chunk_bytes(plan, jsonl)


def _worker_main(
    index: int,
    device: str,
    spec: BackendSpec,
    dirs: WorkDirs,
    plan: Plan,
    opts: dict[str, Any],
    version: str,
    tasks: Any,
    results: Any,
) -> None:
    """Body of one device process: build the backend, report ready, then embed and commit chunks."""
    from ..runner import read_parquet_block
    from ..worker import commit_chunk, embed_block

    try:
        loop = asyncio.new_event_loop()
        backend = spec.on_device(device).build()
        info = loop.run_until_complete(backend.start())
        metadata = {**info.metadata(), "version": version}
        results.put(("ready", index, info.model, info.dim, info.normalize))
        parent = os.getppid()
        while True:
            try:
                item = tasks.get(timeout=POLL * 4)
            except queue.Empty:
                if os.getppid() != parent:  # the parent died (kill -9): do not hold a GPU as an orphan
                    return
                continue
            if item is None:
                break
            chunk, payload = item
            f = plan.files[chunk.file_index]
            if payload is None:
                block = read_parquet_block(f, chunk, opts["id_field"], opts["text_field"])
            else:
                block = parse_lines(payload, chunk.first_line, f.label, opts["id_field"], opts["text_field"])
            result = loop.run_until_complete(
                embed_block(backend, block, info, dedupe=opts["dedupe_texts"], file_label=f.label)
            )
            marker = commit_chunk(dirs, chunk, result, metadata)
            results.put(("done", index, chunk.n_lines, marker))
        loop.run_until_complete(backend.close())
        results.put(("stats", index, backend.stats()))
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        results.put(("error", index, f"{type(exc).__name__}: {exc}", traceback.format_exc()))


class DevicePool:
    """Start one process per device; feed chunks; collect markers; fail fast and loud."""

    def __init__(
        self,
        devices: list[str],
        spec: BackendSpec,
        dirs: WorkDirs,
        plan: Plan,
        opts: dict[str, Any],
        version: str,
    ) -> None:
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self.devices = devices
        # Not daemonic: the local backend tokenizes in child processes of its own, which daemonic processes
        # may not have. Share the cores: two per device stay for the device worker and the parent.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
        self.tokenizer_workers = max(2, (cores - 2 * len(devices)) // len(devices))
        self.tasks = ctx.Queue(maxsize=2 * len(devices))
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker_main,
                name=f"tweet-embed-{d}",
                daemon=False,
                args=(i, d, spec, dirs, plan, opts, version, self.tasks, self.results),
            )
            for i, d in enumerate(devices)
        ]
        self.failed: str | None = None
        self.finished: set[int] = set()

    def start(self) -> None:
        key = "TWEET_EMBED_TOKENIZER_WORKERS"
        saved = os.environ.get(key)
        os.environ.setdefault(key, str(self.tokenizer_workers))  # spawned children inherit the environment
        try:
            for p in self.procs:
                p.start()
        finally:
            if saved is None:
                os.environ.pop(key, None)

    def _dead(self) -> str | None:
        for i, p in enumerate(self.procs):
            if p.exitcode is not None and i not in self.finished:
                return f"worker for {self.devices[i]} exited with code {p.exitcode} without finishing"
        return None

    def get(self) -> tuple[Any, ...]:
        """The next message; raises :class:`WorkerDied` on an error message or a silent death."""
        while True:
            try:
                msg = self.results.get(timeout=POLL)
            except queue.Empty:
                dead = self._dead()
                if dead:
                    try:  # a last message may still be in the pipe
                        msg = self.results.get(timeout=POLL)
                    except queue.Empty:
                        raise WorkerDied(dead) from None
                else:
                    continue
            if msg[0] == "error":
                _, i, text, tb = msg
                raise WorkerDied(f"worker for {self.devices[i]} failed: {text}\n{tb}")
            return tuple(msg)

    def put(self, item: object) -> None:
        while True:
            if self.failed:
                raise WorkerDied(self.failed)
            dead = self._dead()
            if dead:
                raise WorkerDied(dead)
            try:
                self.tasks.put(item, timeout=POLL)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def run_on_devices(
    devices: list[str],
    spec: BackendSpec,
    plan: Plan,
    pending: list[Chunk],
    dirs: WorkDirs,
    opts: dict[str, Any],
    output_options: dict[str, object],
    version: str,
    summary: Any,
    log_interval: float,
) -> None:
    """Embed ``pending`` with one process per device; updates ``summary`` in place."""
    pool = DevicePool(devices, spec, dirs, plan, opts, version)
    pool.start()
    try:
        ready: dict[int, tuple[str, int, bool]] = {}
        while len(ready) < len(devices):
            msg = pool.get()
            if msg[0] == "ready":
                ready[msg[1]] = (msg[2], msg[3], msg[4])
        if len(set(ready.values())) != 1:
            raise BackendError(f"device workers disagree on the model: {sorted(set(ready.values()))}")
        model, dim, normalize = ready[0]
        summary.model, summary.dim = model, dim
        check_manifest(dirs, manifest_key(plan, model, dim, {**output_options, "normalize": normalize}))
        log.info(
            "%d device workers ready (%s): %s, %d dimensions", len(devices), ", ".join(devices), model, dim
        )

        feeder_error: list[BaseException] = []

        def feed() -> None:
            try:
                for item in _payloads(plan, pending):
                    pool.put(item)
                for _ in devices:
                    pool.put(None)
            except BaseException as exc:
                feeder_error.append(exc)
                pool.failed = pool.failed or f"reading input failed: {exc}"

        feeder = threading.Thread(target=feed, name="feeder", daemon=True)
        feeder.start()
        outstanding = len(pending)
        stats_left = len(devices)
        with Progress(total_rows=sum(c.n_lines for c in pending), interval=log_interval) as progress:
            while outstanding or stats_left:
                if feeder_error:
                    raise feeder_error[0]
                msg = pool.get()
                if msg[0] == "done":
                    _, _, n_lines, marker = msg
                    outstanding -= 1
                    summary.rows += marker.rows
                    summary.embedded_texts += marker.embedded_texts
                    summary.chunks_done_now += 1
                    progress.add(marker.rows, n_lines)
                elif msg[0] == "stats":
                    stats_left -= 1
                    pool.finished.add(msg[1])
                    for k, v in msg[2].items():
                        summary.stats[k] = summary.stats.get(k, 0) + v
        feeder.join(timeout=10)
    finally:
        pool.failed = pool.failed or "stopped"
        pool.close()
