"""The TEI-compatible test server: configuration, counters, the aiohttp routes, and its background thread.

See :mod:`tweet_embed.testing.server` for what it mirrors and how to use it; the wire format is in
:mod:`.protocol`, TEI's request checks in :mod:`.validation`, vectors in :mod:`.vectors`, tokens in
:mod:`.tokens`, faults in :mod:`.faults`, and the capacity mode (a simulated GPU and TEI's admission permits)
in :mod:`.device`.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import orjson
from aiohttp import web

from .device import Device, Permits
from .faults import FAULT_FIELDS, FAULT_KINDS, OUTCOMES, Faults
from .process import ServerProcess
from .protocol import (
    CONTROL_PREFIX,
    DEFAULT_PAYLOAD_LIMIT,
    TEI_VERSION,
    Counters,
    EmbedRequest,
    Received,
    Reject,
    ServerURLs,
    json_response,
    parse_embed_request,
    parse_tokenize_request,
    read_struct,
    render,
    tei_error,
    text_response,
    version_tuple,
)
from .tokens import approx_tokens, simple_tokenize
from .validation import check_batch, prompt_text, validate
from .vectors import expected_vectors

__all__ = ["CONTROL_PREFIX", "DEFAULT_PAYLOAD_LIMIT", "TEI_VERSION", "Counters", "Received", "TEIServer"]


_EXTRA_COUNTERS = (
    "requests",  # embed requests (/embed and /v1/embeddings and their aliases), any outcome
    "texts",  # texts answered with 200
    "texts_received",  # texts in every well-formed embed request (all its routes), whatever its answer
    "single_requests",  # embed requests whose input was one text (TEI's method="single")
    "batch_requests",  # ... a list (method="batch")
    "tokenize_requests",
    "texts_tokenized",  # texts answered by /tokenize
    "max_batch",
    "max_in_flight_requests",
    "max_queued_inputs",  # most inputs holding permits at once (accepted, not yet answered)
    "overloaded",  # real 429s from the permits (also counted in "429")
)


class TEIServer(ServerURLs):
    """TEI 1.9.3-compatible embedding server on 127.0.0.1, run in a background thread with its own loop.

    Construction only records settings; ``start()`` / ``with`` binds the port.  Every fault field of
    :class:`Faults` may be passed as a keyword here and changed later with :meth:`set_faults`.
    ``capacity`` (docs/s) turns on the GPU-like mode (see :mod:`.device`); ``prompts`` is a
    sentence-transformers ``prompts`` dict for ``prompt_name``; ``record_requests`` keeps a
    :class:`Received` per request (default: on unless ``precomputed``).
    """

    def __init__(
        self,
        dim: int = 384,
        *,
        model_id: str = "sentence-transformers/all-MiniLM-L6-v2",
        served_model_name: str | None = None,
        model_dtype: str = "float16",
        pooling: str = "mean",
        version: str = TEI_VERSION,
        max_client_batch_size: int = 32,
        max_concurrent_requests: int = 512,
        max_input_length: int = 512,
        max_batch_tokens: int = 16384,
        auto_truncate: bool = False,
        tokenization_workers: int = 8,
        payload_limit: int = DEFAULT_PAYLOAD_LIMIT,
        api_key: str | None = None,
        supports_base64: bool = True,
        precomputed: bool = False,
        track_texts: bool | None = None,
        record_requests: bool | None = None,
        capacity: float | None = None,
        prompts: dict[str, str] | None = None,
        default_prompt_name: str | None = None,
        ignore_dimensions: bool = False,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        **fault_kwargs: float,
    ):
        unknown = set(fault_kwargs) - FAULT_FIELDS
        if unknown:
            raise TypeError(f"unknown TEIServer options: {sorted(unknown)}")
        if default_prompt_name is not None and default_prompt_name not in (prompts or {}):
            raise ValueError(
                f"default_prompt_name {default_prompt_name!r} is not in prompts {sorted(prompts or {})}"
            )
        self.dim = dim
        self.model_id = model_id
        self.served_model_name = served_model_name or model_id
        self.model_dtype = model_dtype
        self.pooling = pooling
        self.version = version
        self.max_client_batch_size = max_client_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self.max_input_length = max_input_length
        self.max_batch_tokens = max_batch_tokens
        self.auto_truncate = auto_truncate
        self.tokenization_workers = tokenization_workers
        self.payload_limit = payload_limit
        self.api_key = api_key
        self.supports_base64 = supports_base64
        self.precomputed = precomputed
        self.track_texts = (not precomputed) if track_texts is None else track_texts
        self.record_requests = self.track_texts if record_requests is None else record_requests
        self.capacity = capacity
        self.prompts = dict(prompts) if prompts else None
        self.default_prompt_name = default_prompt_name
        # a server without Matryoshka support: serde drops the unknown field, the full width comes back
        self.ignore_dimensions = ignore_dimensions
        self.host = host
        self.port = port
        self.healthy = True
        self._faults = replace(faults or Faults(), **fault_kwargs)
        self._rng = random.Random(seed)
        self._script: list[str] = []
        self.validation_status = 422 if version_tuple(version) >= (1, 9, 0) else 413  # TEI's, for Validation

        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._embedded: Counter[str] = Counter()
        self._received_texts: Counter[str] = Counter()
        self._received: list[dict[str, Any]] = []
        self._failures: Counter[str] = Counter()  # TEI's te_request_failure{err}
        self._permits = Permits(max_concurrent_requests)
        self._device = Device(capacity) if capacity else None
        self._in_flight_requests = 0
        self.reset_counters()

        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self._precomputed_vecs: dict[tuple[bool, int | None], np.ndarray] = {}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._hang_release: asyncio.Event | None = None
        self._dead = False
        self._stopped = False
        self._revive: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self._faults

    @property
    def counters(self) -> Counters:
        """Snapshot: outcomes (see OUTCOMES) and the totals named in ``_EXTRA_COUNTERS``, plus
        ``distinct_texts`` (distinct texts answered with 200; needs ``track_texts``).  Readable as
        ``srv.counters["texts"]`` or ``srv.counters()["texts"]``."""
        with self._lock:
            out = Counters(self._counts)
            out["distinct_texts"] = len(self._embedded)
            out["queued_inputs"] = self._permits.held
        return out

    @property
    def embedded(self) -> Counter[str]:
        """Copy of how many times each text was answered successfully (empty if ``track_texts`` is off)."""
        with self._lock:
            return Counter(self._embedded)

    @property
    def received_texts(self) -> Counter[str]:
        """How many times each text arrived in a well-formed embed request, whatever the answer (with
        ``track_texts``); retried requests count again."""
        with self._lock:
            return Counter(self._received_texts)

    @property
    def received(self) -> list[Received]:
        """Every well-formed embed/tokenize request so far, oldest first (with ``record_requests``)."""
        with self._lock:
            return [Received(**r) for r in self._received]

    def reset_counters(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(OUTCOMES, 0)
            self._counts.update(dict.fromkeys(_EXTRA_COUNTERS, 0))
            self._embedded = Counter()
            self._received_texts = Counter()
            self._received = []
            self._failures = Counter()
            self._permits.max_held = self._permits.held

    def set_faults(self, **kw: Any) -> None:
        """Change faults at runtime: any :class:`Faults` field, plus ``healthy`` (``/health`` answers 503
        when false), ``dead`` (refuse connections / come back on the same port) and ``revive_after``
        (seconds; with ``dead=True``, come back by itself — the only way back for a ServerProcess)."""
        dead = kw.pop("dead", None)
        healthy = kw.pop("healthy", None)
        revive_after = kw.pop("revive_after", None)
        unknown = set(kw) - FAULT_FIELDS
        if unknown:
            raise TypeError(f"unknown fault options: {sorted(unknown)}")
        if kw:
            self._faults = replace(self._faults, **kw)
        if healthy is not None:
            self.healthy = bool(healthy)
        if dead is not None and (bool(dead) != self._dead or revive_after is not None):
            self._call_in_loop(self._set_dead(bool(dead), revive_after))

    def queue_faults(self, *outcomes: str) -> None:
        """Script the outcomes of the next embed requests (one per request, before any probability)."""
        bad = [o for o in outcomes if o not in FAULT_KINDS]
        if bad:
            raise ValueError(f"unknown outcomes {bad}; choose from {FAULT_KINDS}")
        with self._lock:
            self._script.extend(outcomes)

    def start(self) -> TEIServer:
        """Bind and serve in a daemon thread; returns self once the port is known."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._astart())
            except BaseException as e:  # report bind errors to the caller
                errors.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._astop())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"TEIServer-{id(self):x}", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Shut down for good: release hung requests, close every connection, stop listening."""
        if self._stopped:
            return
        self._stopped = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)

    def __enter__(self) -> TEIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> TEIServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    @staticmethod
    def spawn_process(cpus: Iterable[int] | None = None, **kwargs: Any) -> ServerProcess:
        """Run a server in a separate Python process (same options as the constructor); see ServerProcess."""
        return ServerProcess(kwargs, cpus=cpus).start()

    def info(self) -> dict[str, Any]:
        """The ``GET /info`` document (TEI's Info schema)."""
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_dtype": self.model_dtype,
            "model_type": {"embedding": {"pooling": self.pooling}},
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_input_length": self.max_input_length,
            "max_batch_tokens": self.max_batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": self.max_client_batch_size,
            "auto_truncate": self.auto_truncate,
            "tokenization_workers": self.tokenization_workers,
            "version": self.version,
            "sha": None,
            "docker_label": None,
            "served_model_name": self.served_model_name,
        }

    def metrics_text(self) -> str:
        """``GET /metrics``: a subset of TEI's Prometheus metrics (names and labels as TEI's), from the counters."""
        c = self.counters
        with self._lock:
            failures = dict(self._failures)
        success = c["ok"] + c["bad_count"] + c["bad_dim"] + c["nan"]
        lines = [
            "# TYPE te_request_count counter",
            f'te_request_count{{method="single"}} {c["single_requests"]}',
            f'te_request_count{{method="batch"}} {c["batch_requests"]}',
            "# TYPE te_request_success counter",
            f"te_request_success {success}",
            "# TYPE te_request_failure counter",
            *(f'te_request_failure{{err="{k}"}} {v}' for k, v in sorted(failures.items())),
            "# TYPE te_queue_size gauge",
            f"te_queue_size {c['queued_inputs']}",
            "# TYPE te_embed_count counter",
            f"te_embed_count {c['texts']}",
        ]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ loop side

    def _call_in_loop(self, coro: Any) -> None:
        """Run a coroutine on the server's loop from another thread and wait for it."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise RuntimeError("server is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("set_faults(dead=...) cannot be called from the server's own thread")
        asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    def _make_app(self) -> web.Application:
        # Body size is enforced by hand (plain-text 413 like axum); aiohttp's own cap is set well above it.
        app = web.Application(client_max_size=max(self.payload_limit * 4, 64 << 20))
        r = app.router
        r.add_get("/health", self._health)
        r.add_get("/", self._health)
        r.add_get("/ping", self._health)
        r.add_get("/info", self._info)
        r.add_get("/metrics", self._metrics)
        r.add_post("/embed", self._embed)
        r.add_post("/", self._embed)
        r.add_post("/invocations", self._embed)
        r.add_post("/v1/embeddings", self._openai)
        r.add_post("/embeddings", self._openai)
        r.add_post("/tokenize", self._tokenize)
        r.add_get(CONTROL_PREFIX + "/counters", self._ctl_counters)
        r.add_get(CONTROL_PREFIX + "/received", self._ctl_received)
        r.add_post(CONTROL_PREFIX + "/reset", self._ctl_reset)
        r.add_post(CONTROL_PREFIX + "/faults", self._ctl_faults)
        return app

    async def _astart(self) -> None:
        self._hang_release = asyncio.Event()
        self._runner = web.AppRunner(
            self._make_app(), access_log=None, handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        await self._bind()

    async def _bind(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._site = site
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    def _abort_connections(self) -> None:
        if self._runner is None or self._runner.server is None:
            return
        for handler in list(self._runner.server.connections):
            transport = handler.transport
            if transport is not None:
                transport.abort()

    async def _set_dead(self, dead: bool, revive_after: float | None = None) -> None:
        if self._revive is not None:
            self._revive.cancel()
            self._revive = None
        if dead == self._dead and not (dead and revive_after is not None):
            return
        self._dead = dead
        if dead:
            if self._site is not None:
                await self._site.stop()
                self._site = None
            self._abort_connections()
            if revive_after is not None:
                self._revive = asyncio.get_running_loop().call_later(
                    revive_after, lambda: self._spawn(self._set_dead(False))
                )
        elif self._site is None and not self._stopped:
            await self._bind()

    def _spawn(self, coro: Any) -> None:
        """Start a background task on the server loop and keep a reference until it ends."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _astop(self) -> None:
        self._dead = True
        if self._revive is not None:
            self._revive.cancel()
        if self._hang_release is not None:
            self._hang_release.set()
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._abort_connections()
        # Handlers still sleeping (latency) or hanging would otherwise be destroyed pending at loop close.
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ helpers

    def _count(self, outcome: str, n: int = 1) -> None:
        with self._lock:
            self._counts[outcome] += n

    def _fail(self, err: str) -> None:
        with self._lock:
            self._failures[err] += 1

    def _rejected(self, r: Reject, record: dict[str, Any] | None) -> web.StreamResponse:
        """Count an early answer (and TEI's failure, if any) and note it on the request's record (if kept);
        returns the answer."""
        self._count(r.outcome)
        if r.failure is not None:
            self._fail(r.failure)
        if record is not None:
            record["status"] = r.response.status
        return r.response

    def _denied(self, request: web.Request) -> web.Response | None:
        """The counted 401 for a request without the API key (when one is set), else None."""
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        self._count("401")
        return web.Response(status=401)

    def _receive(self, route: str, req: EmbedRequest) -> dict[str, Any] | None:
        """Count a well-formed request's texts and (when recording) keep it; returns its record."""
        record = None
        with self._lock:
            if route != "tokenize":  # a text tokenized is not a text sent to the model
                self._counts["texts_received"] += len(req.texts)
                if self.track_texts:
                    self._received_texts.update(req.texts)
            if self.record_requests:
                record = {
                    "route": route,
                    "texts": tuple(req.texts),
                    "prompt_name": req.prompt_name,
                    "dimensions": req.dimensions,
                    "normalize": req.normalize,
                    "truncate": req.truncate,
                    "encoding_format": req.encoding,
                    "model": req.model,
                    "status": 0,
                }
                self._received.append(record)
        return record

    def _parse_request(self, req: dict[str, Any], openai: bool) -> EmbedRequest:
        return parse_embed_request(
            req,
            openai,
            auto_truncate=self.auto_truncate,
            supports_base64=self.supports_base64,
            ignore_dimensions=self.ignore_dimensions,
        )

    def _next_outcome(self) -> str:
        if self._script:
            with self._lock:
                if self._script:
                    return self._script.pop(0)
        return self._faults.draw(self._rng)

    def _vectors(self, texts: list[str], normalize: bool, dimensions: int | None) -> np.ndarray:
        if not self.precomputed:
            return expected_vectors(texts, self.dim, normalize, dimensions)
        key = (normalize, dimensions)
        base = self._precomputed_vecs.get(key)
        n = len(texts)
        if base is None or base.shape[0] < n:
            size = max(n, self.max_client_batch_size, 1)
            names = [f"precomputed vector {i}" for i in range(size)]
            base = expected_vectors(names, self.dim, normalize, dimensions)
            self._precomputed_vecs[key] = base
        return base[:n]

    def _answer(
        self,
        texts: list[str],
        normalize: bool,
        encoding: str,
        openai: bool,
        outcome: str,
        dimensions: int | None = None,
    ) -> bytes:
        """The 200 body for ``texts`` (as the model sees them) with ``outcome``'s defect, if any."""
        n = len(texts)
        if self.precomputed and outcome == "ok":
            key = (openai, n, normalize, encoding, dimensions)
            body = self._bodies.get(key)
            if body is None:
                vecs = self._vectors(texts, normalize, dimensions)
                body = render(vecs, encoding, openai, 16 * n, self.served_model_name)
                self._bodies[key] = body
            return body
        vecs = self._vectors(texts, normalize, dimensions)
        if outcome == "bad_count":
            vecs = vecs[:-1] if n > 1 else np.concatenate([vecs, vecs], axis=0)
        elif outcome == "bad_dim":
            vecs = np.ascontiguousarray(vecs[:, :-1])
        elif outcome == "nan":
            vecs = vecs.copy()
            vecs[0, 0] = np.nan
        tokens = 16 * n if self.precomputed else sum(approx_tokens(t) for t in texts)
        return render(vecs, encoding, openai, tokens, self.served_model_name)

    # ------------------------------------------------------------------ handlers

    async def _health(self, request: web.Request) -> web.StreamResponse:
        if self._dead:
            return await self._drop(request)
        if not self.healthy:
            return json_response(503, {"error": "unhealthy", "error_type": "Unhealthy"})
        return web.Response(status=200)

    async def _info(self, request: web.Request) -> web.StreamResponse:
        if self._dead:
            return await self._drop(request)
        if (denied := self._denied(request)) is not None:
            return denied
        return json_response(200, self.info())

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        if self._dead:
            return await self._drop(request)
        # TEI serves /metrics without the API key (its auth layer wraps the API routes only).
        return web.Response(status=200, text=self.metrics_text(), content_type="text/plain")

    async def _embed(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, openai=False)

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, openai=True)

    async def _drop(self, request: web.Request) -> web.StreamResponse:
        """Abort the connection without an answer (the client sees a disconnect or a reset)."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        # aiohttp treats a cancelled handler as a client disconnect: it writes nothing and closes quietly.
        raise asyncio.CancelledError

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        if self._dead:
            return await self._drop(request)
        if (denied := self._denied(request)) is not None:
            return denied
        record: dict[str, Any] | None = None
        try:
            req, special = parse_tokenize_request(await read_struct(request, self.payload_limit))
            texts = req.texts
            record = self._receive("tokenize", req)
            check_batch(self, len(texts), req.was_batch, False)
            prompt = prompt_text(self, req.prompt_name, False) or ""
        except Reject as r:
            return self._rejected(r, record)
        with self._lock:
            self._counts["tokenize_requests"] += 1
            self._counts["texts_tokenized"] += len(texts)
        tokens = [[t.as_json() for t in simple_tokenize(prompt + text, special)] for text in texts]
        if record is not None:
            record["status"] = 200
        return json_response(200, tokens)

    async def _serve(self, request: web.Request, openai: bool) -> web.StreamResponse:
        if self._dead:
            return await self._drop(request)
        self._count("requests")
        if (denied := self._denied(request)) is not None:
            return denied
        record: dict[str, Any] | None = None
        try:
            req = self._parse_request(await read_struct(request, self.payload_limit), openai)
            self._count("batch_requests" if req.was_batch else "single_requests")
            record = self._receive("openai" if openai else "embed", req)
            seen = validate(self, req, openai)
        except Reject as r:
            return self._rejected(r, record)
        response = await self._work(request, req, seen, openai)
        if record is not None:
            record["status"] = response.status
        return response

    async def _work(
        self, request: web.Request, req: EmbedRequest, seen: list[str], openai: bool
    ) -> web.StreamResponse:
        n = len(seen)
        outcome = self._next_outcome()
        if outcome == "429":
            self._count("429")
            return tei_error(429, "Model is overloaded", "Overloaded", openai).response
        if outcome == "503":
            self._count("503")
            return tei_error(503, "unhealthy", "Unhealthy", openai).response
        if outcome == "drop":
            self._count("dropped")
            return await self._drop(request)
        if outcome == "hang":
            self._count("hung")
            assert self._hang_release is not None
            try:
                await asyncio.wait_for(self._hang_release.wait(), self._faults.hang_seconds)
            except asyncio.TimeoutError:
                pass
            return await self._drop(request)

        with self._lock:
            if n > self._counts["max_batch"]:
                self._counts["max_batch"] = n
        if not self._permits.try_acquire(n):
            self._count("429")
            self._count("overloaded")
            self._fail("overloaded")
            return tei_error(429, "Model is overloaded", "Overloaded", openai).response
        faults = self._faults
        loop = asyncio.get_running_loop()
        try:
            with self._lock:
                self._in_flight_requests += 1
                self._counts["max_in_flight_requests"] = max(
                    self._counts["max_in_flight_requests"], self._in_flight_requests
                )
                self._counts["max_queued_inputs"] = max(self._counts["max_queued_inputs"], self._permits.held)
            ready = loop.time() + faults.latency + faults.latency_per_text * n
            if self._device is not None:
                ready = max(ready, self._device.book(n, loop.time()))
            delay = ready - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._dead:
                return await self._drop(request)
            body = self._answer(seen, req.normalize, req.encoding, openai, outcome, req.dimensions)
        finally:
            self._permits.release(n)
            with self._lock:
                self._in_flight_requests -= 1
        with self._lock:
            if outcome == "ok":
                self._counts["ok"] += 1
                self._counts["texts"] += n
                if self.track_texts:
                    self._embedded.update(req.texts)
            else:
                self._counts[outcome] += 1
        return web.Response(status=200, body=body, content_type="application/json")

    # ------------------------------------------------------------------ control routes

    async def _ctl_counters(self, request: web.Request) -> web.StreamResponse:
        body = {"counters": self.counters, "faults": asdict(self._faults), "dead": self._dead}
        return json_response(200, body)

    async def _ctl_received(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            return json_response(
                200, {"received": self._received, "received_texts": dict(self._received_texts)}
            )

    async def _ctl_reset(self, request: web.Request) -> web.StreamResponse:
        self.reset_counters()
        return json_response(200, {"counters": self.counters})

    async def _ctl_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            kw = orjson.loads(await request.read())
            dead = kw.pop("dead", None)
            revive_after = kw.pop("revive_after", None)
            script = kw.pop("queue", None)
            self.set_faults(**kw)
            if script:
                self.queue_faults(*script)
        except (TypeError, ValueError, orjson.JSONDecodeError, AttributeError) as e:
            return text_response(400, str(e))
        if dead is not None:
            # Answer first, then change the listener (the answer travels on the current connection).
            asyncio.get_running_loop().call_later(
                0.05, lambda: self._spawn(self._set_dead(bool(dead), revive_after))
            )
        return json_response(200, asdict(self._faults))
