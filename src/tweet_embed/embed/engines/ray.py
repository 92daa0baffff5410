"""The Ray engine: the same chunk plan, chunk worker, markers and output, scheduled on a Ray cluster.

The driver (``run_embed_async`` with ``opts.ray`` set) keeps what must be single: the lock, the plan, the
manifest, the progress line and the summary. Each pending chunk becomes one unit of Ray work that runs
:func:`tweet_embed.embed.worker.process_chunk` (read → parse → embed → shard → rejects → marker), exactly as the
local engine's chunks are embedded and committed:

* HTTP backends (TEI, OpenAI-compatible): a Ray **task** per chunk (``num_cpus`` each, any node). Each Ray
  worker process builds its own client from the picklable backend spec once and keeps it for later tasks (a
  persistent event loop per process; HTTP connections are never pickled).
* The in-process model: ``num_gpus=1`` **actors**, one per GPU in the cluster, each loading the model once;
  chunks go to whichever actor is free (two at a time, so writing one shard overlaps the next chunk).

Ray does the concurrency and the retries: a task whose worker dies is re-run (``max_retries``), an actor that
dies is restarted and its calls re-run (``max_restarts``/``max_task_retries``), and I/O errors (``OSError``,
e.g. an object-store hiccup) are retried too. A chunk's marker is written by the worker only after its shard
is in place, so a retried or duplicated attempt rewrites the same shard and the output stays exactly once.

Input: plain JSONL and Parquet chunks are read by the task itself (a seek / a row range). Compressed JSONL
(``.gz``/``.zst``) cannot seek, so the driver decompresses each such file once, sequentially, and ships the
chunk bytes with the task; for large runs, plain or pre-split compressed input spreads that reading too.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tweet_embed.backends import BackendSpec
from tweet_embed.backends.base import Backend, BackendError, BackendInfo
from tweet_embed.embed.chunks import (
    Chunk,
    InputFile,
    Marker,
    Plan,
    WorkDirs,
    check_manifest,
    iter_chunk_bytes,
    manifest_key,
)
from tweet_embed.embed.worker import ChunkOptions, process_chunk
from tweet_embed.input.records import is_compressed
from tweet_embed.input.rules import rules_metadata
from tweet_embed.progress import Progress
from tweet_embed.storage import absolute

if TYPE_CHECKING:
    from tweet_embed.embed.options import EmbedOptions, Summary

log = logging.getLogger("tweet_embed")
INSTALL_HINT = "the Ray engine needs Ray: pip install 'tweet-embed[ray]'"


class ClusterError(BackendError):
    """Ray could not run a chunk (a worker or node kept dying past the retries, the cluster went away)."""


@dataclass
class RayOptions:
    """How chunks are scheduled on Ray (``--engine ray``)."""

    address: str | None = None  # "auto", "ray://head:10001", ...; None: RAY_ADDRESS or a new local instance
    cpus_per_task: float = 1.0  # HTTP tasks; below 1 packs several client tasks per core
    use_actors: bool | None = None  # None: actors for the in-process model, tasks for HTTP servers
    actors: int | None = None  # None: one per GPU in the cluster (one actor when there is none)
    gpus_per_actor: float | None = None  # None: 1/workers_per_gpu when the cluster has GPUs, else 0 (CPU)
    workers_per_gpu: int = 1  # actors sharing each GPU (--workers-per-device): a small model outruns one
    cpus_per_actor: float = 1.0
    max_retries: int = 3
    in_flight: int | None = None  # chunks submitted at once; None: twice what the cluster runs at once
    init_kwargs: dict[str, Any] = field(default_factory=dict)  # extra ray.init() arguments (num_cpus=...)


@dataclass(frozen=True)
class _Job:
    """What every chunk of one run shares; put in the object store once."""

    key: str  # one per run: a worker's cached backend belongs to one run
    factory: Callable[[], Backend]
    dirs: WorkDirs
    metadata: dict[str, str]
    copts: ChunkOptions
    model: str
    dim: int
    slots: int  # chunks running at once in the cluster: shares the servers' capacity between them


# ------------------------------------------------------------------------------------------- worker side


class _Runtime:
    """Per Ray worker process: one event loop thread and the started backend of the current run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tweet-embed-loop", daemon=True)
        self.thread.start()
        self.key: str | None = None
        self.backend: Backend | None = None
        self.info: BackendInfo | None = None
        self.limiter: asyncio.Semaphore | None = None
        self.lock = asyncio.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        """Close the kept client when the worker process ends (no 'unclosed session' noise)."""
        if self.backend is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.drop(), self.loop).result(timeout=5)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def backend_for(
        self, key: str, factory: Callable[[], Backend], slots: int
    ) -> tuple[Backend, BackendInfo]:
        async with self.lock:
            if self.key != key or self.backend is None or self.info is None:
                if self.backend is not None:
                    with contextlib.suppress(Exception):
                        await self.backend.close()
                    self.backend = None
                backend = factory()
                info = await backend.start()
                self.backend, self.info, self.key = backend, info, key
                share = max(2, math.ceil(info.max_in_flight / max(1, slots)))
                self.limiter = asyncio.Semaphore(share)
            return self.backend, self.info

    async def drop(self) -> None:
        """Forget the backend after a failure: the next chunk starts a fresh one."""
        async with self.lock:
            if self.backend is not None:
                with contextlib.suppress(Exception):
                    await self.backend.close()
            self.backend, self.info, self.key = None, None, None


_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def _get_runtime() -> _Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = _Runtime()
        return _runtime


def run_chunk(
    job: _Job, f: InputFile, chunk: Chunk, data: bytes | None, stats: bool = True
) -> tuple[Marker, dict[str, int]]:
    """One chunk on a Ray worker: the shared :func:`process_chunk`, with this process's backend.

    Returns the marker and what the backend's counters grew by (a task runs alone in its process, so the
    difference is this chunk's; actors run two chunks at once and report their counters at the end instead).
    """
    rt = _get_runtime()

    async def go() -> tuple[Marker, dict[str, int]]:
        backend, info = await rt.backend_for(job.key, job.factory, job.slots)
        if (info.model, info.dim) != (job.model, job.dim):
            raise BackendError(
                f"a worker's backend serves {info.model} ({info.dim} dimensions), "
                f"the run was started with {job.model} ({job.dim})"
            )
        before = dict(backend.stats())
        try:
            marker = await process_chunk(
                f, chunk, job.dirs, backend, info, job.metadata, job.copts, data=data, limiter=rt.limiter
            )
        except BaseException:
            await rt.drop()
            raise
        if not stats:
            return marker, {}
        after = backend.stats()
        return marker, {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}

    return rt.run(go())  # type: ignore[no-any-return]


def _start_actor_backend(job_key: str, factory: Callable[[], Backend], slots: int) -> BackendInfo:
    rt = _get_runtime()
    return rt.run(rt.backend_for(job_key, factory, slots))[1]  # type: ignore[no-any-return]


class ChunkActor:
    """Holds the in-process model (one per GPU); ``process`` runs one chunk like a task does."""

    def __init__(self, key: str, factory: Callable[[], Backend]) -> None:
        self.key, self.factory = key, factory

    def start(self) -> BackendInfo:
        return _start_actor_backend(self.key, self.factory, 1)

    def process(
        self, job: _Job, f: InputFile, chunk: Chunk, data: bytes | None
    ) -> tuple[Marker, dict[str, int]]:
        _start_actor_backend(self.key, self.factory, 1)  # after a restart the constructor ran again: load
        return run_chunk(job, f, chunk, data, stats=False)

    def stats(self) -> dict[str, int]:
        rt = _get_runtime()
        return dict(rt.backend.stats()) if rt.backend is not None else {}

    def pid(self) -> int:
        return os.getpid()


# ------------------------------------------------------------------------------------------- driver side


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise BackendError(INSTALL_HINT) from exc
    return ray


def _work_items(plan: Plan, pending: list[Chunk]) -> Iterator[tuple[Chunk, bytes | None]]:
    """Pending chunks in plan order; compressed JSONL chunks with their bytes (each file read once, here)."""
    i = 0
    while i < len(pending):
        c = pending[i]
        f = plan.files[c.file_index]
        if f.kind != "parquet" and is_compressed(f.path):
            j = i
            while j < len(pending) and pending[j].file_index == c.file_index:
                j += 1
            yield from iter_chunk_bytes(plan, pending[i:j])
            i = j
        else:
            yield c, None
            i += 1


@contextlib.contextmanager
def _connected(ropts: RayOptions) -> Iterator[Any]:
    """Join the cluster (or start a local instance); shut down only what this call started."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs = dict(ropts.init_kwargs)
    kwargs.setdefault("log_to_driver", True)
    if ropts.address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs.setdefault("include_dashboard", False)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    t0 = time.monotonic()
    ray.init(address=ropts.address, **kwargs)
    if main and previous is not None:
        signal.signal(signal.SIGTERM, previous)  # keep the CLI's SIGTERM → clean stop, exit code 130
    res = ray.cluster_resources()
    log.info(
        "Ray: %d node(s), %g CPUs, %g GPUs (connected in %.1fs)",
        len(ray.nodes()),
        res.get("CPU", 0),
        res.get("GPU", 0),
        time.monotonic() - t0,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _unwrap(ray: Any, exc: BaseException) -> BaseException:
    """A task's own exception (BackendError, InputError, OSError...) rather than Ray's wrapper."""
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            log.debug("remote traceback:\n%s", exc)
            return cause
    if isinstance(exc, ray.exceptions.RayError):
        return ClusterError(f"Ray could not run a chunk: {type(exc).__name__}: {exc}")
    return exc


async def run_on_ray(
    opts: EmbedOptions,
    make_backend: Callable[[], Backend] | BackendSpec,
    plan: Plan,
    pending: list[Chunk],
    summary: Summary,
) -> None:
    """Embed ``pending`` on Ray; updates ``summary`` in place. Called by ``run_embed_async`` under its lock.

    Blocks the event loop on purpose while it waits on Ray: nothing else runs on it, and a SIGTERM/Ctrl-C
    then lands here, which cancels the outstanding tasks before the error reaches the caller.
    """
    from tweet_embed._version import __version__
    from tweet_embed.embed.options import output_options

    ropts: RayOptions = opts.ray
    if isinstance(make_backend, BackendSpec):
        if getattr(make_backend, "workers", None):  # the tasks are the parallelism: one decode thread each
            make_backend = dataclasses.replace(make_backend, workers=None)  # type: ignore[call-arg]
        factory: Callable[[], Backend] = make_backend.build
        use_actors = ropts.use_actors if ropts.use_actors is not None else make_backend.is_local
    else:
        factory = make_backend
        use_actors = bool(ropts.use_actors)
    d = opts.dirs
    dirs = WorkDirs(absolute(d.tmp), absolute(d.progress), absolute(d.shards))  # workers have another cwd
    copts = ChunkOptions(opts.id_field, opts.text_field, opts.dedupe_texts, opts.rules)
    key = uuid.uuid4().hex

    with _connected(ropts) as ray:
        actors: list[Any] = []
        if use_actors:
            actors, info = _start_actors(ray, ropts, key, factory)
            slots = 2 * len(actors)
        else:
            probe = factory()  # the driver learns model and dimension once, for the manifest
            try:
                info = await probe.start()
            finally:
                with contextlib.suppress(Exception):
                    await probe.close()
            slots = max(1, int(ray.cluster_resources().get("CPU", 1) // max(ropts.cpus_per_task, 1e-3)))
        summary.model, summary.dim = info.model, info.dim
        check_manifest(d, manifest_key(plan, info.model, info.dim, output_options(opts, info)))
        metadata = {**info.metadata(), "version": __version__, **rules_metadata(opts.rules)}
        job = _Job(key, factory, dirs, metadata, copts, info.model, info.dim, slots)
        job_ref = ray.put(job)
        limit = ropts.in_flight or max(2 * slots, opts.chunks_in_flight)

        if actors:
            free = [a for a in actors for _ in range(2)]
            submit_actor = {}

            def submit(c: Chunk, data: bytes | None) -> Any:
                actor = free.pop(0)
                ref = actor.process.remote(job_ref, plan.files[c.file_index], c, data)
                submit_actor[ref] = actor
                return ref

            limit = min(limit, len(free))
        else:
            task = ray.remote(run_chunk).options(
                num_cpus=ropts.cpus_per_task, max_retries=ropts.max_retries, retry_exceptions=[OSError]
            )

            def submit(c: Chunk, data: bytes | None) -> Any:
                return task.remote(job_ref, plan.files[c.file_index], c, data)

        log.info(
            "Ray engine: %d chunks as %s, up to %d at once",
            len(pending),
            f"calls on {len(actors)} actor(s)" if actors else "tasks",
            limit,
        )
        items = _work_items(plan, pending)
        inflight: dict[Any, Chunk] = {}
        with Progress(total_rows=sum(c.n_lines for c in pending), interval=opts.log_interval) as progress:
            try:
                exhausted = False
                while True:
                    while not exhausted and len(inflight) < limit:
                        item = next(items, None)
                        if item is None:
                            exhausted = True
                            break
                        inflight[submit(*item)] = item[0]
                    if not inflight:
                        break
                    ready, _ = ray.wait(list(inflight), num_returns=1)
                    for ref in ready:
                        chunk = inflight.pop(ref)
                        if actors:
                            free.append(submit_actor.pop(ref))
                        try:
                            marker, stats = ray.get(ref)
                        except Exception as exc:
                            raise _unwrap(ray, exc) from None
                        summary.rows += marker.rows
                        summary.embedded_texts += marker.embedded_texts
                        summary.chunks_done_now += 1
                        for k, v in stats.items():
                            summary.stats[k] = summary.stats.get(k, 0) + v
                        progress.add(marker.rows, chunk.n_lines)
                for counters in ray.get([a.stats.remote() for a in actors]):
                    for k, v in counters.items():
                        summary.stats[k] = summary.stats.get(k, 0) + v
            except BaseException:
                for ref in inflight:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref)
                raise
            finally:
                for a in actors:
                    with contextlib.suppress(Exception):
                        ray.kill(a)


def actor_layout(gpus: float, ropts: RayOptions) -> tuple[int, float]:
    """``(actors, GPU share of each)`` for a cluster with ``gpus`` GPUs.

    ``workers_per_gpu`` actors share each GPU (``num_gpus=1/N``), for the same reason as
    ``--workers-per-device`` on one machine; on a cluster without GPUs, that many CPU actors.
    """
    w = max(1, int(ropts.workers_per_gpu))
    if ropts.gpus_per_actor is not None:
        per = float(ropts.gpus_per_actor)
        return ropts.actors or (int(gpus / per + 1e-9) if per > 0 else w), per
    if not gpus:
        return ropts.actors or w, 0.0
    return ropts.actors or int(gpus) * w, 1.0 / w


def _start_actors(
    ray: Any, ropts: RayOptions, key: str, factory: Callable[[], Backend]
) -> tuple[list[Any], BackendInfo]:
    gpus = ray.cluster_resources().get("GPU", 0)
    n, per = actor_layout(gpus, ropts)
    if n < 1:
        raise ClusterError(f"the cluster has {gpus:g} GPUs: not enough for one actor with {per:g} GPU each")
    if not per:
        log.warning("no GPU in the Ray cluster: the in-process model runs on CPU in %d actor(s)", n)
    cls = ray.remote(ChunkActor).options(
        num_gpus=per,
        num_cpus=ropts.cpus_per_actor,
        max_restarts=ropts.max_retries,
        max_task_retries=ropts.max_retries,
        max_concurrency=2,
    )
    actors = [cls.remote(key, factory) for _ in range(n)]
    try:
        infos = ray.get([a.start.remote() for a in actors])
    except Exception as exc:
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a)
        raise _unwrap(ray, exc) from None
    seen = {(i.model, i.dim, i.normalize) for i in infos}
    if len(seen) != 1:
        raise BackendError(f"actors disagree on the model: {sorted(seen)}")
    log.info("%d actor(s) ready with %g GPU each: %s, %d dimensions", n, per, infos[0].model, infos[0].dim)
    return actors, infos[0]


__all__ = ["RayOptions", "ClusterError", "run_on_ray", "run_chunk", "ChunkActor", "actor_layout"]
