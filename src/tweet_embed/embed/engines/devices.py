"""Several GPUs on one machine: one worker process per device, each taking whole chunks.

The parent keeps what must be single (the lock, the plan, the manifest check, reading compressed input once,
sequentially) and hands chunks to a bounded queue; each worker builds its own backend from a picklable
:class:`~tweet_embed.backends.BackendSpec` on its device, embeds, and commits its chunks with the same
``worker.commit_chunk`` (shard, rejects, marker) as every other engine. Errors in a worker travel back as
messages; a worker that dies without a word is noticed by its exit code: the parent never waits forever.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing as mp
import os
import queue
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tweet_embed.backends import BackendSpec
from tweet_embed.backends.base import BackendError
from tweet_embed.embed.chunks import Chunk, Plan, WorkDirs, check_manifest, iter_chunk_bytes, manifest_key
from tweet_embed.embed.options import backend_options
from tweet_embed.input.rules import rules_metadata
from tweet_embed.procs import CPU_THREADS_ENV, available_cores, exit_with_parent
from tweet_embed.progress import Progress

log = logging.getLogger("tweet_embed")
POLL = 0.5  # seconds between liveness checks while waiting on a queue


class WorkerDied(BackendError):
    """A device worker exited or raised; the message carries its device and traceback or exit code."""


def _payloads(plan: Plan, pending: list[Chunk]) -> Iterator[tuple[Chunk, bytes | None]]:
    """Text chunks (JSONL, arrays, CSV...) with their bytes (read once, sequentially, here); Parquet chunks by
    reference."""
    jsonl = [c for c in pending if plan.files[c.file_index].kind != "parquet"]
    for c in pending:
        if plan.files[c.file_index].kind == "parquet":
            yield c, None
    yield from iter_chunk_bytes(plan, jsonl)


CHUNKS_IN_FLIGHT = 2  # per worker: one chunk tokenizes while the other runs on the device
WRITES_IN_FLIGHT = 2  # finished chunks being written while the next ones embed


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
    exit_with_parent()  # never an orphan holding a GPU, even when the parent dies halfway through a message
    try:
        loop = asyncio.new_event_loop()
        backend = spec.on_device(device).build()
        try:
            info = loop.run_until_complete(backend.start())
            metadata = {**info.metadata(), "version": version, **rules_metadata(opts["rules"])}
            results.put(
                ("ready", index, info.model, info.dim, info.normalize, tuple(sorted(info.extra.items())))
            )
            loop.run_until_complete(_serve(index, backend, info, dirs, plan, opts, metadata, tasks, results))
        finally:
            loop.run_until_complete(backend.close())
        # the final figures: nothing in flight any more (a chunk's own report may have caught the other one's)
        results.put(("stats", index, backend.stats(), backend.telemetry()))
    except BaseException as exc:  # report everything, KeyboardInterrupt included
        results.put(("error", index, f"{type(exc).__name__}: {exc}", traceback.format_exc()))


async def _serve(
    index: int,
    backend: Any,
    info: Any,
    dirs: WorkDirs,
    plan: Plan,
    opts: dict[str, Any],
    metadata: dict[str, str],
    tasks: Any,
    results: Any,
) -> None:
    """Take chunks until the parent's ``None``, in the same pipeline as the local engine (``run_pipeline``):
    up to ``CHUNKS_IN_FLIGHT`` chunks embedding (the local backend runs two calls at once, one tokenizing while
    the other is on the device) while the next is parsed and finished ones are written."""
    from tweet_embed.embed.worker import ChunkOptions, commit_chunk, embed_chunk, read_block, run_pipeline

    copts = ChunkOptions(opts["id_field"], opts["text_field"], dedupe=opts["dedupe"], rules=opts["rules"])
    stopping = threading.Event()

    def next_block() -> tuple[Chunk, Any] | None:
        while True:
            try:
                item = tasks.get(timeout=POLL)
                break
            except queue.Empty:
                if stopping.is_set():  # this worker failed: let the thread end, so the process can
                    return None
        if item is None:
            return None
        chunk, payload = item
        return chunk, read_block(plan.files[chunk.file_index], chunk, copts, payload)

    async def embed(chunk: Chunk, block: Any) -> Any:
        label = plan.files[chunk.file_index].label
        return await embed_chunk(backend, chunk, block, info, copts, file_label=label)

    async def report_every(seconds: float) -> None:
        # between chunks too (a chunk on a slow backend can take minutes); on the loop's thread, where the
        # HTTP pool's counters change, so a snapshot never reads them mid-update
        while True:
            await asyncio.sleep(seconds)
            results.put(("telemetry", index, backend.telemetry()))

    reporter = asyncio.ensure_future(report_every(max(0.1, float(opts.get("report_s", 5.0)))))
    try:
        await run_pipeline(
            next_block,
            embed,
            lambda chunk, result: commit_chunk(dirs, chunk, result, metadata),
            # each finished chunk carries the backend's cumulative figures (per endpoint, per device)
            lambda chunk, marker: results.put(("done", index, chunk.n_lines, marker, backend.telemetry())),
            chunks_in_flight=CHUNKS_IN_FLIGHT,
            writes_in_flight=WRITES_IN_FLIGHT,
        )
    finally:
        reporter.cancel()
        stopping.set()


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
        self.labels = worker_labels(devices)
        # Not daemonic: the local backend tokenizes in child processes of its own, which daemonic processes
        # may not have. Share the cores: two per device stay for the device worker and the parent.
        self.tokenizer_workers = max(2, (available_cores() - 2 * len(devices)) // len(devices))
        self.tasks = ctx.Queue(maxsize=2 * len(devices))
        self.results = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker_main,
                name=f"tweet-embed-{label}",
                daemon=False,
                args=(i, d, spec, dirs, plan, opts, version, self.tasks, self.results),
            )
            for i, (d, label) in enumerate(zip(devices, self.labels, strict=True))
        ]
        self.failed: str | None = None
        self.finished: set[int] = set()

    def start(self) -> None:
        env = {"TWEET_EMBED_TOKENIZER_WORKERS": str(self.tokenizer_workers)}
        on_cpu = sum(d == "cpu" for d in self.devices)
        if on_cpu:  # K CPU workers share the cores instead of each starting a thread per core
            env[CPU_THREADS_ENV] = str(max(1, available_cores() // on_cpu))
        saved = {k: os.environ.get(k) for k in env}
        for k, value in env.items():
            os.environ.setdefault(k, value)  # spawned children inherit the environment
        try:
            for proc in self.procs:
                proc.start()
        finally:
            for k, old in saved.items():
                if old is None:
                    os.environ.pop(k, None)

    def _dead(self) -> str | None:
        for i, p in enumerate(self.procs):
            if p.exitcode is not None and i not in self.finished:
                return f"worker for {self.labels[i]} exited with code {p.exitcode} without finishing"
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
                raise WorkerDied(f"worker for {self.labels[i]} failed: {text}\n{tb}")
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
    on_telemetry: Callable[[str, str, dict[str, Any]], None] | None = None,
) -> None:
    """Embed ``pending`` with one process per device; updates ``summary`` in place. ``on_telemetry(key,
    worker, snapshot)`` receives each worker's cumulative ``Backend.telemetry`` (with each finished chunk,
    every ``log_interval`` seconds, and at its end)."""
    opts = {**opts, "report_s": log_interval}
    pool = DevicePool(devices, spec, dirs, plan, opts, version)
    pool.start()
    try:
        ready: dict[int, tuple[str, int, bool, tuple[tuple[str, str], ...]]] = {}
        while len(ready) < len(devices):
            msg = pool.get()
            if msg[0] == "ready":
                ready[msg[1]] = (msg[2], msg[3], msg[4], msg[5])
        if len(set(ready.values())) != 1:
            raise BackendError(f"device workers disagree on the model: {sorted(set(ready.values()))}")
        model, dim, normalize, extra = ready[0]
        summary.model, summary.dim = model, dim
        options = {**output_options, **backend_options(normalize, dict(extra))}
        check_manifest(dirs, manifest_key(plan, model, dim, options))
        log.info(
            "%d device workers ready (%s): %s, %d dimensions",
            len(devices),
            ", ".join(pool.labels),
            model,
            dim,
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
                if on_telemetry is not None and msg[0] in ("done", "telemetry", "stats"):
                    label = pool.labels[msg[1]]
                    on_telemetry(label, label, msg[-1])
                if msg[0] == "done":
                    n_lines, marker = msg[2], msg[3]
                    outstanding -= 1
                    summary.rows += marker.rows
                    summary.embedded_texts += marker.embedded_texts
                    summary.reused += marker.reused
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


# ----------------------------------------------------------------------------------------------- pure helpers


def worker_labels(devices: Sequence[str]) -> list[str]:
    """Names for log lines and process titles: the device, with ``#k`` where a device has several workers."""
    counts = {d: devices.count(d) for d in devices}
    seen: dict[str, int] = {}
    out = []
    for d in devices:
        k = seen[d] = seen.get(d, -1) + 1
        out.append(f"{d}#{k}" if counts[d] > 1 else d)
    return out


def expand_devices(devices: Sequence[str], per_device: int) -> list[str]:
    """Each device ``per_device`` times, device-major: ``(['cuda:0', 'cuda:1'], 2)`` -> 0, 0, 1, 1."""
    if per_device < 1:
        raise BackendError(f"--workers-per-device must be at least 1, not {per_device}")
    return [d for d in devices for _ in range(per_device)]


def default_workers_per_device(
    devices: Callable[[], Sequence[str]], width: int | None, cores: int | None = None
) -> int:
    """Worker processes per GPU when ``--workers-per-device`` is not given.

    Two for a small model (hidden size up to 512, e.g. MiniLM) on CUDA with at least 8 cores per GPU, else one.
    Why: a small model's GPU outruns one Python process. On the 16-core H200 the run loop alone (reading,
    parsing and writing with a null model) managed 144k docs/s, two thirds of MiniLM's raw forward limit
    (222k), before any tokenizing or launching; every step of it holds the GIL at some point. Two processes
    each feed the GPU from their own GIL, and the GPU interleaves their batches. A large model keeps the
    GPU busy from one process, and a second would only add a context switch and a second set of
    activations.

    ``devices`` is called only when the cheap tests leave the answer open: finding the GPUs may import torch.
    """
    if width is None or width > 512:
        return 1
    cores = available_cores() if cores is None else cores
    if cores < 8:
        return 1
    listed = devices()
    if not listed or not all(d.startswith("cuda") for d in listed):
        return 1
    return 2 if cores >= 8 * len(set(listed)) else 1


def plan_workers(
    devices_arg: str | None, device_arg: str | None, model: str | None, per_device: int | None
) -> list[str] | None:
    """The device of each worker process for ``--devices``/``--device``/``--workers-per-device``; None: run
    in this process (on ``--device`` or the default device).

    A small machine or a large model never imports torch here to look for GPUs (see
    :func:`default_workers_per_device`).
    """
    from tweet_embed.backends.local import model_width, resolve_devices

    listed = resolve_devices(devices_arg) if devices_arg else None

    @functools.cache
    def base() -> list[str]:  # the devices to repeat; may import torch to look for GPUs
        return listed or ([device_arg] if device_arg else resolve_devices(None))

    if per_device is None:
        per_device = default_workers_per_device(base, model_width(model))
    if per_device == 1:
        return listed
    return expand_devices(base(), per_device)
