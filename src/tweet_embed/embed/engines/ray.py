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

Ray does the concurrency and most retries: a task whose worker or node dies is re-run (``max_retries``), and
I/O errors (``OSError``, e.g. an object-store hiccup) are retried too. An actor is never restarted by Ray: when
its node leaves, the GPU it held left too, and a restart (with the calls queued on it) would wait for one
forever. The driver instead sends that actor's chunks to the other actors, starts a replacement where the
cluster has room, and starts more actors when GPUs join (:class:`_Schedule`, :class:`_ActorPool`). A chunk's
marker is written by the worker only after its shard is in place, so a retried or duplicated attempt rewrites
the same shard and the output stays exactly once. The tests on a multi-node cluster (a node removed or added
mid-run, the driver killed and re-run): tests/embed/test_engine_ray_cluster.py.

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
import os
import signal
import socket
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
    actor_wait_s: float = 600.0  # with every actor lost, how long to wait for one to be placed again
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
        self.backend_id = ""  # one per started backend: the driver keeps each one's latest figures
        self.lock = asyncio.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        """Close the kept client when the worker process ends (no 'unclosed session' noise)."""
        if self.backend is not None and self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.drop(), self.loop).result(timeout=5)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def telemetry(self) -> dict[str, Any]:
        """This process's backend figures for the driver (``Backend.telemetry``), named for the cluster:
        worker ``host:pid``, devices ``host/cuda:0`` (every node has a cuda:0)."""
        backend = self.backend
        if backend is None:
            return {}
        host = socket.gethostname()
        snap = backend.telemetry()
        snap["devices"] = {f"{host}/{d}": c for d, c in snap.get("devices", {}).items()}
        return {"key": self.backend_id, "worker": f"{host}:{os.getpid()}", "snapshot": snap}

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
                self.backend_id = uuid.uuid4().hex
                # the servers' capacity shared out, rounded down: rounded up, the tasks together queue more
                # than the servers accept and get 429s (bench/ray_nodes.py, 3 nodes)
                share = max(1, info.max_in_flight // max(1, slots))
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
) -> tuple[Marker, dict[str, int], dict[str, Any]]:
    """One chunk on a Ray worker: the shared :func:`process_chunk`, with this process's backend.

    Returns the marker, what the backend's counters grew by (a task runs alone in its process, so the
    difference is this chunk's; actors run two chunks at once and report their counters at the end instead),
    and the backend's cumulative figures per endpoint and device (:meth:`_Runtime.telemetry`).
    """
    rt = _get_runtime()

    async def go() -> tuple[Marker, dict[str, int], dict[str, Any]]:
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
            return marker, {}, rt.telemetry()
        after = backend.stats()
        grew = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
        return marker, grew, rt.telemetry()

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
    ) -> tuple[Marker, dict[str, int], dict[str, Any]]:
        _start_actor_backend(self.key, self.factory, 1)  # after a restart the constructor ran again: load
        return run_chunk(job, f, chunk, data, stats=False)

    def stats(self) -> dict[str, int]:
        rt = _get_runtime()
        return dict(rt.backend.stats()) if rt.backend is not None else {}

    def telemetry(self) -> dict[str, Any]:
        return _get_runtime().telemetry()

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
    address = ropts.address
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs.setdefault("include_dashboard", False)
        # a new local instance, as documented: ray.init() with no address would join whatever cluster was
        # last started on this machine (`ray start --head`, another user's), found in /tmp/ray
        address = "local"
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    t0 = time.monotonic()
    ray.init(address=address, **kwargs)
    if main and previous is not None:
        signal.signal(signal.SIGTERM, previous)  # keep the CLI's SIGTERM → clean stop, exit code 130
    res = ray.cluster_resources()
    log.info(
        "Ray: %d node(s), %g CPUs, %g GPUs (connected in %.1fs)",
        sum(1 for n in ray.nodes() if n.get("Alive")),  # nodes() also lists the ones that have left
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
    on_telemetry: Callable[[str, str, dict[str, Any]], None] | None = None,
) -> None:
    """Embed ``pending`` on Ray; updates ``summary`` in place. Called by ``run_embed_async`` under its lock.
    ``on_telemetry(key, worker, snapshot)`` receives each worker backend's cumulative figures as its chunks
    finish (and each actor's at the end).

    Blocks the event loop on purpose while it waits on Ray: nothing else runs on it, and a SIGTERM/Ctrl-C
    then lands here, which cancels the outstanding tasks before the error reaches the caller.
    """
    from tweet_embed._version import __version__
    from tweet_embed.embed.options import chunk_options, output_options

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
    copts = chunk_options(opts)
    key = uuid.uuid4().hex

    with _connected(ropts) as ray:
        pool: _ActorPool | None = None
        if use_actors:
            pool = _ActorPool(ray, ropts, key, factory)
            info = pool.start()
        else:
            probe = factory()  # the driver learns model and dimension once, for the manifest
            try:
                info = await probe.start()
            finally:
                with contextlib.suppress(Exception):
                    await probe.close()
        try:
            slots = 2 * len(pool.ready) if pool else _task_slots(ray, ropts)
            summary.model, summary.dim = info.model, info.dim
            check_manifest(d, manifest_key(plan, info.model, info.dim, output_options(opts, info)))
            metadata = {**info.metadata(), "version": __version__, **rules_metadata(opts.rules)}
            job = _Job(key, factory, dirs, metadata, copts, info.model, info.dim, slots)
            log.info(
                "Ray engine: %d chunks as %s",
                len(pending),
                f"calls on {len(pool.ready)} actor(s)" if pool else f"tasks, {slots} at once",
            )
            run = _Schedule(
                ray, ropts, opts.chunks_in_flight, ray.put(job), plan, pool, copts.dedupe is not None
            )
            with Progress(total_rows=sum(c.n_lines for c in pending), interval=opts.log_interval) as progress:
                for chunk, marker, stats, figures in run.results(_work_items(plan, pending)):
                    if on_telemetry is not None and figures:
                        on_telemetry(figures["key"], figures["worker"], figures["snapshot"])
                    summary.rows += marker.rows
                    summary.embedded_texts += marker.embedded_texts
                    summary.reused += marker.reused
                    summary.chunks_done_now += 1
                    for k, v in stats.items():
                        summary.stats[k] = summary.stats.get(k, 0) + v
                    progress.add(marker.rows, chunk.n_lines)
            for k, v in (pool.stats() if pool else {}).items():
                summary.stats[k] = summary.stats.get(k, 0) + v
            if pool and on_telemetry is not None:  # the actors' final figures (nothing in flight)
                for figures in pool.telemetry():
                    on_telemetry(figures["key"], figures["worker"], figures["snapshot"])
        finally:
            if pool:
                pool.close()


_RESCAN_S = 2.0  # how often the driver looks at the cluster's size (nodes come and go)


def _task_slots(ray: Any, ropts: RayOptions) -> int:
    """HTTP tasks the cluster runs at once now (its CPUs over each task's share)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1) // max(ropts.cpus_per_task, 1e-3)))


class _Schedule:
    """Keeps the cluster fed with chunks and yields each finished one; resubmits a chunk whose actor was lost.

    Tasks: Ray re-runs a task whose worker or node died (``max_retries``); how many are submitted at once
    follows the cluster's CPUs, re-read every few seconds, so a node that joins gets chunks at once.
    Actors: a call whose actor died (its node gone, its process killed) comes back here as a RayActorError and
    the chunk goes to another actor (at most ``max_retries`` times per chunk): Ray's own restart of that actor
    could wait forever for a GPU that left with the node, and calls queued on it would wait with it.
    """

    def __init__(
        self,
        ray: Any,
        ropts: RayOptions,
        chunks_in_flight: int,
        job_ref: Any,
        plan: Plan,
        pool: _ActorPool | None,
        dedupe: bool = False,
    ) -> None:
        self.ray, self.ropts, self.job_ref, self.plan, self.pool = ray, ropts, job_ref, plan, pool
        self.dedupe = dedupe
        self.chunks_in_flight = chunks_in_flight
        self.inflight: dict[Any, tuple[Chunk, bytes | None, Any]] = {}  # ref -> (chunk, its bytes, its actor)
        self.retry: list[tuple[Chunk, bytes | None]] = []
        self.attempts: dict[str, int] = {}
        self.task: Any = None
        if pool is None:
            self.task = ray.remote(run_chunk).options(
                num_cpus=ropts.cpus_per_task, max_retries=ropts.max_retries, retry_exceptions=[OSError]
            )
        self.limit = self._limit()
        self.rescanned = time.monotonic()

    def _limit(self) -> int:
        if self.pool is not None:
            return self.ropts.in_flight or 1 << 30  # the actors' free call slots are the limit
        slots = _task_slots(self.ray, self.ropts)
        limit = self.ropts.in_flight or max(2 * slots, self.chunks_in_flight)
        # with dedupe a chunk may wait for an earlier chunk's shared vectors: only as many tasks as run at
        # once, so the earliest unfinished chunk is always running, whatever order Ray starts queued tasks in
        return min(limit, slots) if self.dedupe else limit

    def _can_submit(self) -> bool:
        return len(self.inflight) < self.limit and (self.pool is None or bool(self.pool.free))

    def _submit(self, c: Chunk, data: bytes | None) -> None:
        f = self.plan.files[c.file_index]
        if self.pool is None:
            self.inflight[self.task.remote(self.job_ref, f, c, data)] = (c, data, None)
            return
        actor = self.pool.free.pop(0)
        self.inflight[actor.process.remote(self.job_ref, f, c, data)] = (c, data, actor)

    def results(
        self, items: Iterator[tuple[Chunk, bytes | None]]
    ) -> Iterator[tuple[Chunk, Marker, dict[str, int], dict[str, Any]]]:
        ray = self.ray
        try:
            exhausted = False
            while True:
                if time.monotonic() - self.rescanned > _RESCAN_S:
                    self.rescanned = time.monotonic()
                    self.limit = self._limit()
                    if self.pool is not None:
                        self.pool.grow()
                if self.pool is not None:
                    self.pool.poll()
                while self._can_submit() and (self.retry or not exhausted):
                    if self.retry:
                        self._submit(*self.retry.pop(0))
                        continue
                    item = next(items, None)
                    if item is None:
                        exhausted = True
                        break
                    self._submit(*item)
                if not self.inflight and not self.retry and exhausted:
                    return
                if not self.inflight:  # work left, but no actor to run it: wait for a replacement
                    assert self.pool is not None
                    self.pool.wait_for_actor()
                    continue
                waiting = list(self.inflight) + (list(self.pool.starting) if self.pool else [])
                ready, _ = ray.wait(waiting, num_returns=1, timeout=_RESCAN_S)
                for ref in ready:
                    if ref not in self.inflight:
                        continue  # an actor came up: poll() takes it next round
                    chunk, data, actor = self.inflight.pop(ref)
                    try:
                        marker, stats, figures = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        self._actor_lost(actor, chunk, data, exc)
                        continue
                    except Exception as exc:
                        err = _unwrap(ray, exc)
                        if self.pool is None or not isinstance(err, OSError):
                            raise err from None
                        # as tasks retry OSError (an object-store hiccup): again, on whichever actor is free
                        self._count_attempt(chunk, err)
                        self.pool.release(actor)
                        self.retry.append((chunk, data))
                        continue
                    if self.pool is not None:
                        self.pool.release(actor)
                    yield chunk, marker, stats, figures
        except BaseException:
            for ref in self.inflight:
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            raise

    def _count_attempt(self, chunk: Chunk, exc: BaseException) -> int:
        """One more failed attempt of ``chunk`` on an actor; past ``max_retries`` the run stops."""
        n = self.attempts[chunk.name] = self.attempts.get(chunk.name, 0) + 1
        if n > self.ropts.max_retries:
            raise ClusterError(
                f"chunk {chunk.name} failed {n} times on actors (last: {type(exc).__name__}: {exc})"
            ) from None
        return n

    def _actor_lost(self, actor: Any, chunk: Chunk, data: bytes | None, exc: BaseException) -> None:
        assert self.pool is not None
        n = self._count_attempt(chunk, exc)
        self.pool.lost(actor, exc)
        log.warning("chunk %s: its actor was lost; it goes to another actor (attempt %d)", chunk.name, n + 1)
        self.retry.append((chunk, data))


class _ActorPool:
    """The in-process model's actors (one per GPU share in the cluster) and their free call slots.

    Two calls per actor at once, so that writing one shard overlaps the next chunk. An actor that is lost is
    killed for good (no Ray restart, see :class:`_Schedule`) and replaced when the cluster still has room for
    it; when GPUs join, more actors are started. A replacement's place may come only later (a node must join):
    the run then waits up to ``actor_wait_s`` with no actor before it gives up.
    """

    def __init__(self, ray: Any, ropts: RayOptions, key: str, factory: Callable[[], Backend]) -> None:
        self.ray, self.ropts, self.key, self.factory = ray, ropts, key, factory
        self.ready: list[Any] = []
        self.free: list[Any] = []  # one entry per free call slot
        self.starting: dict[
            Any, Any
        ] = {}  # the start() call's ref -> the actor, until it has loaded the model
        self.info: BackendInfo | None = None
        self.per = 0.0
        self.cls: Any = None
        self.gone = 0

    def _new(self) -> Any:
        actor = self.cls.remote(self.key, self.factory)
        self.starting[actor.start.remote()] = actor
        return actor

    def start(self) -> BackendInfo:
        ray = self.ray
        gpus = ray.cluster_resources().get("GPU", 0)
        n, self.per = actor_layout(gpus, self.ropts)
        if n < 1:
            raise ClusterError(
                f"the cluster has {gpus:g} GPUs: not enough for one actor with {self.per:g} GPU each"
            )
        if not self.per:
            log.warning("no GPU in the Ray cluster: the in-process model runs on CPU in %d actor(s)", n)
        self.cls = ray.remote(ChunkActor).options(
            num_gpus=self.per, num_cpus=self.ropts.cpus_per_actor, max_restarts=0, max_concurrency=2
        )
        for _ in range(n):
            self._new()
        refs = list(self.starting)
        try:
            infos = ray.get(refs)
        except Exception as exc:
            self.close()
            raise _unwrap(ray, exc) from None
        seen = {(i.model, i.dim, i.normalize) for i in infos}
        if len(seen) != 1:
            self.close()
            raise BackendError(f"actors disagree on the model: {sorted(seen)}")
        for r in refs:
            self._add(self.starting.pop(r))
        self.info = infos[0]
        log.info(
            "%d actor(s) ready with %g GPU each: %s, %d dimensions",
            n,
            self.per,
            self.info.model,
            self.info.dim,
        )
        return self.info

    def _add(self, actor: Any) -> None:
        self.ready.append(actor)
        self.free.extend([actor, actor])

    def release(self, actor: Any) -> None:
        if actor in self.ready:
            self.free.append(actor)

    def lost(self, actor: Any, exc: BaseException) -> None:
        if actor not in self.ready:
            return  # its other call already reported it
        self.ready.remove(actor)
        self.free = [a for a in self.free if a is not actor]
        self.gone += 1
        log.warning("an actor was lost (%s): %d left", type(exc).__name__, len(self.ready))
        with contextlib.suppress(Exception):
            self.ray.kill(actor, no_restart=True)
        self.grow()

    def grow(self) -> None:
        """Start actors up to what the cluster holds now (a replacement, or a GPU that joined)."""
        if self.ropts.actors is not None:
            want = self.ropts.actors
        elif self.per:  # GPU actors: as many as the GPUs there are now hold
            want = int(self.ray.cluster_resources().get("GPU", 0) / self.per + 1e-9)
        else:  # CPU actors (a cluster without GPUs at the start): a fixed number
            want = actor_layout(0, self.ropts)[0]
        for _ in range(want - len(self.ready) - len(self.starting)):
            self._new()
            log.info("starting an actor (%d ready, %d starting)", len(self.ready), len(self.starting))

    def poll(self) -> None:
        """Take in the actors that have loaded the model; drop those that failed to."""
        if not self.starting:
            return
        done, _ = self.ray.wait(list(self.starting), num_returns=len(self.starting), timeout=0)
        for ref in done:
            actor = self.starting.pop(ref)
            try:
                info = self.ray.get(ref)
            except Exception as exc:
                log.warning("a new actor failed to start: %s", _unwrap(self.ray, exc))
                with contextlib.suppress(Exception):
                    self.ray.kill(actor, no_restart=True)
                continue
            assert self.info is not None
            if (info.model, info.dim, info.normalize) != (
                self.info.model,
                self.info.dim,
                self.info.normalize,
            ):
                raise BackendError(f"a new actor serves {info.model} ({info.dim}), the run {self.info.model}")
            self._add(actor)
            log.info("an actor joined: %d ready", len(self.ready))

    def wait_for_actor(self) -> None:
        """No actor is left: wait for one to be placed and loaded (a node joining), up to ``actor_wait_s``."""
        deadline = time.monotonic() + self.ropts.actor_wait_s
        log.warning("no actor left: waiting up to %gs for one to be placed", self.ropts.actor_wait_s)
        while not self.ready:
            self.grow()
            if self.starting:
                self.ray.wait(list(self.starting), num_returns=1, timeout=_RESCAN_S)
            else:
                time.sleep(_RESCAN_S)
            self.poll()
            if not self.ready and time.monotonic() > deadline:
                raise ClusterError(f"no actor could be placed on the cluster in {self.ropts.actor_wait_s:g}s")

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for counters in self.ray.get([a.stats.remote() for a in self.ready]):
            for k, v in counters.items():
                out[k] = out.get(k, 0) + v
        return out

    def telemetry(self) -> list[dict[str, Any]]:
        return [t for t in self.ray.get([a.telemetry.remote() for a in self.ready]) if t]

    def close(self) -> None:
        for a in [*self.ready, *self.starting.values()]:
            with contextlib.suppress(Exception):
                self.ray.kill(a, no_restart=True)
        self.ready, self.free, self.starting = [], [], {}


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


__all__ = ["RayOptions", "ClusterError", "run_on_ray", "run_chunk", "ChunkActor", "actor_layout"]
