"""A real local HTTP server that speaks text-embeddings-inference (TEI) 1.9.3's API, with fault injection.

Why it exists: the HTTP backends, the integration tests and the benchmarks need a server that answers like
TEI (same routes, JSON shapes, status codes and plain-text framework errors) but is fast, deterministic and
can be told to misbehave (429/503, dropped connections, hangs, wrong shapes, NaN, dying).

Routes (as in TEI's router): ``GET /health`` (also ``GET /`` and ``GET /ping``), ``GET /info``,
``POST /embed`` (also ``POST /`` and ``/invocations``), ``POST /v1/embeddings`` (also ``/embeddings``).
Test-only control routes, never faulted or authenticated: ``GET /__testserver__/counters`` and
``POST /__testserver__/faults`` (a JSON object of :meth:`TEIServer.set_faults` keywords).

How it mirrors TEI (router/src/http/server.rs, axum):

* Vectors: :func:`expected_vectors` — a deterministic pseudo-random float32 vector per text (blake2b of the
  UTF-8 bytes picks signed rows of a fixed Gaussian table), L2-normalised when ``normalize`` is true.
  JSON floats are written in shortest float32 form, so ``np.float32(parsed)`` equals the vector bit for bit.
* Errors from TEI itself are JSON ``{"error", "error_type"}`` (``/embed``) or
  ``{"message", "code", "error_type"}`` (``/v1/embeddings``); ``error_type`` is one of
  Unhealthy/Backend/Overloaded/Validation/Tokenizer/Empty.  Status codes: Empty 400, Overloaded 429,
  Tokenizer 422, Unhealthy 503, Validation 422 for ``version >= 1.9.0`` and 413 before.
* Errors from axum's ``Json`` extractor are plain text: wrong/missing Content-Type → 415
  ``Expected request with `Content-Type: application/json```; body over ``payload_limit`` (TEI default
  2_000_000 bytes) → 413 ``Failed to buffer the request body: length limit exceeded``; invalid JSON —
  including a lone surrogate escape such as ``"\\ud83d"`` that serde_json refuses — → 400
  ``Failed to parse the request body as JSON: ...``; valid JSON of the wrong shape (missing ``inputs``,
  wrong types, unknown ``encoding_format``) → 422 ``Failed to deserialize the JSON body into the target
  type: ...``.
* Auth (``api_key``): every route but the health ones needs ``Authorization: Bearer <key>``, else 401 with
  an empty body (TEI's middleware).
* Token counts are approximated (no tokenizer here): ``2 + max(words, ceil(utf8_bytes / 4))`` where words
  are whitespace-separated; more than ``max_input_length`` with truncation off gives TEI's Validation error
  ``Input validation error: `inputs` must have less than 512 tokens. Given: N``.  With truncation the
  vector is still that of the whole text.  ``/v1/embeddings`` truncates only when ``auto_truncate`` is set,
  like TEI, and always normalises.
* Overload: a request whose inputs would push the texts being embedded at once (during the artificial
  latency) above ``max_concurrent_requests`` gets 429 ``Model is overloaded``.  With no latency nothing is
  ever in flight across an ``await``, so this only shows up with ``latency``.
* The empty-batch message is TEI's real ``\\`inputs\\` cannot be empty`` (the OpenAPI example text
  "Batch is empty" is only an example); error_type ``Empty``, status 400.

Faults (probabilities per embed request, checked in this order, the first that fires wins; a seeded RNG
makes a sequential run reproducible): ``p_429``, ``p_503``, ``p_drop`` (close the connection, no
response), ``p_hang`` (never answer until ``hang_seconds`` pass or the server stops, then drop),
``p_bad_count`` (one vector too few, or one extra for a single input), ``p_bad_dim`` (each vector one
element short), ``p_nan`` (first element of the first vector is NaN: ``null`` in JSON floats, a real NaN
in base64).  :meth:`TEIServer.queue_faults` scripts the next outcomes exactly.  ``dead=True`` closes the
listening socket and every open connection (connections are refused) until ``dead=False`` rebinds the same
port (or ``revive_after`` seconds pass, the way back for a ServerProcess); :meth:`TEIServer.stop` is the
final shutdown (in-flight requests are dropped).

Fast mode (``precomputed=True``) for benchmarks: every answer of n vectors is a cached body of n fixed
vectors that do not depend on the texts (correctness checks on vectors are meaningless there; usage token
counts are fake).  Requests are still parsed and validated.

Use from sync tests::

    with TEIServer(dim=384, p_503=0.1) as srv:
        ...  # srv.url, srv.embed_url, srv.openai_url, srv.set_faults(...), srv.counters, srv.embedded

Off-process (benchmarks)::

    with TEIServer.spawn_process(dim=384, precomputed=True) as proc:
        ...  # proc.url, proc.set_faults(...), proc.counters (via the control routes)

Standalone: ``python -m tweet_embed.testing.server --port 18090 --dim 384`` prints its URL and serves until
killed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from aiohttp import web

__all__ = [
    "TEIServer",
    "ServerProcess",
    "Faults",
    "expected_vector",
    "expected_vectors",
    "approx_tokens",
    "OUTCOMES",
    "FAULT_KINDS",
    "TEI_VERSION",
    "DEFAULT_PAYLOAD_LIMIT",
]

TEI_VERSION = "1.9.3"
DEFAULT_PAYLOAD_LIMIT = 2_000_000  # TEI's --payload-limit default (bytes)
CONTROL_PREFIX = "/__testserver__"

# Outcome counters (pre-created so snapshots never race a dict resize).
OUTCOMES = (
    "ok",
    "429",
    "503",
    "dropped",
    "hung",
    "bad_count",
    "bad_dim",
    "nan",
    "413",
    "422",
    "400",
    "401",
    "415",
)
# Scriptable outcomes for queue_faults (same order as the probability checks).
FAULT_KINDS = ("ok", "429", "503", "drop", "hang", "bad_count", "bad_dim", "nan")

_TABLE_ROWS = 4096  # rows of the Gaussian table; 16-bit hash words pick rows with the low 12 bits
_TERMS = 8  # signed rows summed per vector
_CHUNK = 256  # rows per vectorised step (keeps the (rows, terms, dim) gather in cache)


# ----------------------------------------------------------------------------------------------- vectors


@lru_cache(maxsize=8)
def _table(dim: int) -> np.ndarray:
    """Fixed Gaussian table for one dimension (same in every process: seeded by the dimension)."""
    rng = np.random.default_rng([0x7E1E, dim])
    tab = rng.standard_normal((_TABLE_ROWS, dim), dtype=np.float32)
    tab.flags.writeable = False
    return tab


def _vectors_chunk(texts: Sequence[str], dim: int, normalize: bool) -> np.ndarray:
    n = len(texts)
    digest = b"".join(
        hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=2 * _TERMS).digest() for t in texts
    )
    words = np.frombuffer(digest, dtype="<u2").reshape(n, _TERMS)
    idx = (words & (_TABLE_ROWS - 1)).astype(np.intp)
    signs = np.where(words & 0x8000, np.float32(-1.0), np.float32(1.0)).astype(np.float32)
    # (n, 1, T) @ (n, T, dim): one small product per row, so a row never depends on the batch around it.
    out = np.matmul(signs[:, None, :], _table(dim)[idx])[:, 0, :]
    if normalize:
        # Row-wise reduction: each row's norm does not depend on the other rows in the batch.
        norms = np.sqrt(np.add.reduce(out * out, axis=1, keepdims=True))
        out /= norms
    return out


def expected_vectors(texts: Sequence[str], dim: int, normalize: bool = True) -> np.ndarray:
    """The float32 ``(n, dim)`` vectors the server returns for ``texts`` (row i belongs to texts[i]).

    Deterministic, independent of batching, and fast (vectorised; ~1 µs per text at dim 384).
    """
    n = len(texts)
    if n <= _CHUNK:
        if n == 0:
            return np.zeros((0, dim), dtype=np.float32)
        return _vectors_chunk(texts, dim, normalize)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK] = _vectors_chunk(texts[start : start + _CHUNK], dim, normalize)
    return out


@lru_cache(maxsize=4096)
def expected_vector(text: str, dim: int, normalize: bool = True) -> np.ndarray:
    """The float32 vector the server returns for one text (read-only, cached)."""
    v = _vectors_chunk([text], dim, normalize)[0]
    v.flags.writeable = False
    return v


def approx_tokens(text: str) -> int:
    """Token count stand-in: ``2 + max(whitespace words, ceil(utf8 bytes / 4))`` (2 = CLS + SEP)."""
    nbytes = len(text.encode("utf-8", "surrogatepass"))
    return 2 + max(len(text.split()), (nbytes + 3) // 4)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# ------------------------------------------------------------------------------------------------ faults


@dataclass(frozen=True)
class Faults:
    """Per-request fault probabilities and latency; replaced as a whole so other threads may flip them."""

    p_429: float = 0.0
    p_503: float = 0.0
    p_drop: float = 0.0
    p_hang: float = 0.0
    p_bad_count: float = 0.0
    p_bad_dim: float = 0.0
    p_nan: float = 0.0
    latency: float = 0.0  # seconds added to every embed request
    latency_per_text: float = 0.0  # seconds added per input text
    hang_seconds: float = 3600.0  # a hung request is dropped after this long (or at stop())

    def draw(self, rng: random.Random) -> str:
        for kind, p in (
            ("429", self.p_429),
            ("503", self.p_503),
            ("drop", self.p_drop),
            ("hang", self.p_hang),
            ("bad_count", self.p_bad_count),
            ("bad_dim", self.p_bad_dim),
            ("nan", self.p_nan),
        ):
            if p > 0.0 and (p >= 1.0 or rng.random() < p):
                return kind
        return "ok"


_FAULT_FIELDS = {f.name for f in fields(Faults)}


class _Reject(Exception):
    """An early answer (error) from request parsing/validation."""

    def __init__(self, response: web.StreamResponse, outcome: str):
        super().__init__(outcome)
        self.response = response
        self.outcome = outcome


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain")


def _json(status: int, obj: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


# ------------------------------------------------------------------------------------------------ server


class TEIServer:
    """TEI 1.9.3-compatible embedding server on 127.0.0.1, run in a background thread with its own loop.

    Construction only records settings; ``start()`` / ``with`` binds the port.  Every fault field of
    :class:`Faults` may be passed as a keyword here and changed later with :meth:`set_faults`.
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
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        **fault_kwargs: float,
    ):
        unknown = set(fault_kwargs) - _FAULT_FIELDS
        if unknown:
            raise TypeError(f"unknown TEIServer options: {sorted(unknown)}")
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
        self.host = host
        self.port = port
        self.healthy = True
        self._faults = replace(faults or Faults(), **fault_kwargs)
        self._rng = random.Random(seed)
        self._script: list[str] = []
        self._validation_status = 422 if _version_tuple(version) >= (1, 9, 0) else 413

        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._embedded: Counter[str] = Counter()
        self.reset_counters()
        self._in_flight_texts = 0
        self._in_flight_requests = 0

        self._bodies: dict[tuple[Any, ...], bytes] = {}
        self._precomputed_vecs: dict[bool, np.ndarray] = {}

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
    def embed_url(self) -> str:
        return self.url + "/embed"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1/embeddings"

    @property
    def faults(self) -> Faults:
        return self._faults

    @property
    def counters(self) -> dict[str, int]:
        """Snapshot: outcomes (see OUTCOMES), ``requests`` (embed requests), ``texts`` (embedded OK),
        ``max_batch``, ``max_in_flight_requests``, ``overloaded`` (real 429s, also in ``429``)."""
        with self._lock:
            return dict(self._counts)

    @property
    def embedded(self) -> Counter[str]:
        """Copy of how many times each text was answered successfully (empty if ``track_texts`` is off)."""
        with self._lock:
            return Counter(self._embedded)

    def reset_counters(self) -> None:
        with self._lock:
            self._counts = dict.fromkeys(OUTCOMES, 0)
            self._counts.update(requests=0, texts=0, max_batch=0, max_in_flight_requests=0, overloaded=0)
            self._embedded = Counter()

    def set_faults(self, **kw: Any) -> None:
        """Change faults at runtime: any :class:`Faults` field, plus ``healthy`` (``/health`` answers 503
        when false), ``dead`` (refuse connections / come back on the same port) and ``revive_after``
        (seconds; with ``dead=True``, come back by itself — the only way back for a ServerProcess)."""
        dead = kw.pop("dead", None)
        healthy = kw.pop("healthy", None)
        revive_after = kw.pop("revive_after", None)
        unknown = set(kw) - _FAULT_FIELDS
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
        """Shut down for good: release hung requests, close every connection, stop refusing-free listening."""
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
        r.add_post("/embed", self._embed)
        r.add_post("/", self._embed)
        r.add_post("/invocations", self._embed)
        r.add_post("/v1/embeddings", self._openai)
        r.add_post("/embeddings", self._openai)
        r.add_get(CONTROL_PREFIX + "/counters", self._ctl_counters)
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

    def _authorized(self, request: web.Request) -> bool:
        if self.api_key is None:
            return True
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _read_json(self, request: web.Request) -> Any:
        """axum's ``Json`` extractor: content type, body limit, then parse; errors in plain text."""
        ctype = request.headers.get("Content-Type", "")
        mime = ctype.split(";", 1)[0].strip().lower()
        if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
            raise _Reject(_text(415, "Expected request with `Content-Type: application/json`"), "415")
        limit = self.payload_limit
        too_big = _Reject(_text(413, "Failed to buffer the request body: length limit exceeded"), "413")
        clen = request.content_length
        if clen is not None and clen > limit:
            await self._drain(request)
            raise too_big
        body = await request.read()
        if len(body) > limit:
            raise too_big
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise _Reject(_text(400, f"Failed to parse the request body as JSON: {e}"), "400") from None

    @staticmethod
    async def _drain(request: web.Request) -> None:
        """Read and discard an oversized body so the client can finish sending and read the 413."""
        while True:
            chunk = await request.content.read(1 << 20)
            if not chunk:
                return

    @staticmethod
    def _deserialize_error(what: str) -> _Reject:
        return _Reject(_text(422, f"Failed to deserialize the JSON body into the target type: {what}"), "422")

    def _parse_inputs(self, value: Any, field: str) -> tuple[list[str], bool]:
        """TEI ``Input``: a string, token ids, or a list of those. Returns (texts, was_batch)."""
        if isinstance(value, str):
            return [value], False
        if isinstance(value, list):
            if value and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
                return [_ids_text(value)], False  # a single input of token ids
            texts: list[str] = []
            for item in value:
                if isinstance(item, str):
                    texts.append(item)
                elif isinstance(item, list) and all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in item
                ):
                    texts.append(_ids_text(item))
                else:
                    raise self._deserialize_error(
                        f"{field}: data did not match any variant of untagged enum Input"
                    )
            return texts, True
        if value is None:
            raise self._deserialize_error(f"missing field `{field}`")
        raise self._deserialize_error(f"{field}: data did not match any variant of untagged enum Input")

    def _validate(self, texts: list[str], was_batch: bool, truncate: bool, openai: bool) -> None:
        """TEI's own checks, in its order: empty batch, batch size, then each input's token count."""
        n = len(texts)
        if was_batch and n == 0:
            raise self._tei_error(400, "`inputs` cannot be empty", "Empty", openai)
        if was_batch and n > self.max_client_batch_size:
            raise self._tei_error(
                self._validation_status,
                f"batch size {n} > maximum allowed batch size {self.max_client_batch_size}",
                "Validation",
                openai,
            )
        if not truncate:
            limit = self.max_input_length
            for t in texts:
                # Cheap pre-screen: approx_tokens(t) <= 2 + len(t), so short texts cannot exceed.
                if len(t) + 2 > limit:
                    tokens = approx_tokens(t)
                    if tokens > limit:
                        raise self._tei_error(
                            self._validation_status,
                            f"Input validation error: `inputs` must have less than {limit} tokens. "
                            f"Given: {tokens}",
                            "Validation",
                            openai,
                        )

    @staticmethod
    def _tei_error(status: int, message: str, error_type: str, openai: bool) -> _Reject:
        if openai:
            body = {"message": message, "code": status, "error_type": error_type}
        else:
            body = {"error": message, "error_type": error_type}
        return _Reject(_json(status, body), str(status))

    def _next_outcome(self) -> str:
        if self._script:
            with self._lock:
                if self._script:
                    return self._script.pop(0)
        return self._faults.draw(self._rng)

    def _vectors(self, texts: list[str], normalize: bool) -> np.ndarray:
        if not self.precomputed:
            return expected_vectors(texts, self.dim, normalize)
        base = self._precomputed_vecs.get(normalize)
        n = len(texts)
        if base is None or base.shape[0] < n:
            size = max(n, self.max_client_batch_size, 1)
            base = expected_vectors([f"precomputed vector {i}" for i in range(size)], self.dim, normalize)
            self._precomputed_vecs[normalize] = base
        return base[:n]

    # ------------------------------------------------------------------ handlers

    async def _health(self, request: web.Request) -> web.StreamResponse:
        if self._dead:
            return await self._drop(request)
        if not self.healthy:
            return _json(503, {"error": "unhealthy", "error_type": "Unhealthy"})
        return web.Response(status=200)

    async def _info(self, request: web.Request) -> web.StreamResponse:
        if self._dead:
            return await self._drop(request)
        if not self._authorized(request):
            self._count("401")
            return web.Response(status=401)
        return _json(200, self.info())

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

    async def _serve(self, request: web.Request, openai: bool) -> web.StreamResponse:
        if self._dead:
            return await self._drop(request)
        self._count("requests")
        if not self._authorized(request):
            self._count("401")
            return web.Response(status=401)
        try:
            req = await self._read_json(request)
            if not isinstance(req, dict):
                raise self._deserialize_error("invalid type: expected struct")
            texts, was_batch, normalize, truncate, encoding = self._parse_request(req, openai)
            self._validate(texts, was_batch, truncate, openai)
        except _Reject as r:
            self._count(r.outcome)
            return r.response
        n = len(texts)

        outcome = self._next_outcome()
        if outcome == "429":
            self._count("429")
            return self._tei_error(429, "Model is overloaded", "Overloaded", openai).response
        if outcome == "503":
            self._count("503")
            return self._tei_error(503, "unhealthy", "Unhealthy", openai).response
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

        faults = self._faults
        delay = faults.latency + faults.latency_per_text * n
        with self._lock:
            if self._in_flight_texts + n > self.max_concurrent_requests and self._in_flight_texts > 0:
                overloaded = True
            else:
                overloaded = False
                self._in_flight_texts += n
                self._in_flight_requests += 1
                if self._in_flight_requests > self._counts["max_in_flight_requests"]:
                    self._counts["max_in_flight_requests"] = self._in_flight_requests
            if n > self._counts["max_batch"]:
                self._counts["max_batch"] = n
        if overloaded:
            self._count("429")
            self._count("overloaded")
            return self._tei_error(429, "Model is overloaded", "Overloaded", openai).response
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            if self._dead:
                return await self._drop(request)
            body = self._answer(texts, normalize, encoding, openai, outcome)
        finally:
            with self._lock:
                self._in_flight_texts -= n
                self._in_flight_requests -= 1
        with self._lock:
            if outcome == "ok":
                self._counts["ok"] += 1
                self._counts["texts"] += n
                if self.track_texts:
                    self._embedded.update(texts)
            else:
                self._counts[outcome] += 1
        return web.Response(status=200, body=body, content_type="application/json")

    def _parse_request(self, req: dict[str, Any], openai: bool) -> tuple[list[str], bool, bool, bool, str]:
        if openai:
            if "input" not in req:
                raise self._deserialize_error("missing field `input`")
            texts, was_batch = self._parse_inputs(req["input"], "input")
            encoding = req.get("encoding_format", "float")
            if encoding is None:
                encoding = "float"
            allowed = ("float", "base64") if self.supports_base64 else ("float",)
            if encoding not in allowed:
                variants = " or ".join(f"`{a}`" for a in allowed)
                raise self._deserialize_error(
                    f"encoding_format: unknown variant `{encoding}`, expected {variants}"
                )
            model = req.get("model")
            if model is not None and not isinstance(model, str):
                raise self._deserialize_error("model: invalid type: expected a string")
            return texts, was_batch, True, self.auto_truncate, encoding
        if "inputs" not in req:
            raise self._deserialize_error("missing field `inputs`")
        texts, was_batch = self._parse_inputs(req["inputs"], "inputs")
        normalize = req.get("normalize", True)
        if not isinstance(normalize, bool):
            raise self._deserialize_error("normalize: invalid type: expected a boolean")
        truncate = req.get("truncate")
        if truncate is None:
            truncate = self.auto_truncate
        elif not isinstance(truncate, bool):
            raise self._deserialize_error("truncate: invalid type: expected a boolean")
        return texts, was_batch, normalize, truncate, "float"

    def _answer(self, texts: list[str], normalize: bool, encoding: str, openai: bool, outcome: str) -> bytes:
        n = len(texts)
        if self.precomputed and outcome == "ok":
            key = (openai, n, normalize, encoding)
            body = self._bodies.get(key)
            if body is None:
                body = self._render(self._vectors(texts, normalize), encoding, openai, tokens=16 * n)
                self._bodies[key] = body
            return body
        vecs = self._vectors(texts, normalize)
        if outcome == "bad_count":
            vecs = vecs[:-1] if n > 1 else np.concatenate([vecs, vecs], axis=0)
        elif outcome == "bad_dim":
            vecs = np.ascontiguousarray(vecs[:, :-1])
        elif outcome == "nan":
            vecs = vecs.copy()
            vecs[0, 0] = np.nan
        tokens = 16 * n if self.precomputed else sum(approx_tokens(t) for t in texts)
        return self._render(vecs, encoding, openai, tokens)

    def _render(self, vecs: np.ndarray, encoding: str, openai: bool, tokens: int) -> bytes:
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if not openai:
            return orjson.dumps(vecs, option=orjson.OPT_SERIALIZE_NUMPY)
        if encoding == "base64":
            le = vecs.astype("<f4", copy=False)
            data = [
                {
                    "object": "embedding",
                    "embedding": base64.b64encode(row.tobytes()).decode("ascii"),
                    "index": i,
                }
                for i, row in enumerate(le)
            ]
        else:
            data = [{"object": "embedding", "embedding": row, "index": i} for i, row in enumerate(vecs)]
        return orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": self.served_model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )

    # ------------------------------------------------------------------ control routes

    async def _ctl_counters(self, request: web.Request) -> web.StreamResponse:
        body = {"counters": self.counters, "faults": asdict(self._faults), "dead": self._dead}
        return _json(200, body)

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
            return _text(400, str(e))
        if dead is not None:
            # Answer first, then change the listener (the answer travels on the current connection).
            asyncio.get_running_loop().call_later(
                0.05, lambda: self._spawn(self._set_dead(bool(dead), revive_after))
            )
        return _json(200, asdict(self._faults))


def _ids_text(ids: list[int]) -> str:
    """Stable text stand-in for an input given as token ids (its vector derives from this)."""
    return "\x00ids:" + ",".join(map(str, ids))


# ----------------------------------------------------------------------------------------- other process


class ServerProcess:
    """A TEIServer in a child Python process (``python -m tweet_embed.testing.server --config-json ...``).

    Benchmarks use it so the server's CPU does not compete with the client's event loop/GIL.
    ``set_faults`` / ``queue_faults`` / ``counters`` go through the control routes over HTTP.
    """

    def __init__(self, options: dict[str, Any], cpus: Iterable[int] | None = None):
        self.options = dict(options)
        self.cpus = list(cpus) if cpus is not None else None
        self.url = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def embed_url(self) -> str:
        return self.url + "/embed"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1/embeddings"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def command(self) -> list[str]:
        """The child's command line; the child prints its URL on a line of its own once it listens."""
        return [sys.executable, "-m", "tweet_embed.testing.server", "--config-json", json.dumps(self.options)]

    def start(self, timeout: float = 60.0) -> ServerProcess:
        if self.proc is not None:
            return self
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, env=env)
        if self.cpus is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.proc.pid, self.cpus)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.startswith(b"http"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("test server process failed to start")
            line = self.proc.stdout.readline().strip()
        self.url = line.decode()
        return self

    def _control(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(self.url + CONTROL_PREFIX + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def set_faults(self, **kw: Any) -> None:
        self._control("POST", "/faults", kw)
        if "dead" in kw:
            time.sleep(0.2)  # the child flips the listener just after answering

    def queue_faults(self, *outcomes: str) -> None:
        self._control("POST", "/faults", {"queue": list(outcomes)})

    @property
    def counters(self) -> dict[str, int]:
        return dict(self._control("GET", "/counters")["counters"])

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------------- main


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tweet_embed.testing.server", description=__doc__.split("\n")[0]
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = ephemeral")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--model-id", default=None)
    p.add_argument("--version", default=None, help=f"TEI version to claim (default {TEI_VERSION})")
    p.add_argument("--max-client-batch-size", type=int, default=None)
    p.add_argument("--max-concurrent-requests", type=int, default=None)
    p.add_argument("--max-input-length", type=int, default=None)
    p.add_argument("--payload-limit", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-base64", action="store_true", help="reject encoding_format=base64 with 422")
    p.add_argument("--auto-truncate", action="store_true")
    p.add_argument("--precomputed", action="store_true", help="fast mode: vectors do not depend on texts")
    p.add_argument("--seed", type=int, default=None)
    for name in sorted(_FAULT_FIELDS):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    p.add_argument("--config-json", default=None, help="JSON object of TEIServer keyword arguments")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    opts: dict[str, Any] = json.loads(args.config_json) if args.config_json else {}
    simple = {
        "dim": args.dim,
        "model_id": args.model_id,
        "version": args.version,
        "max_client_batch_size": args.max_client_batch_size,
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_input_length": args.max_input_length,
        "payload_limit": args.payload_limit,
        "api_key": args.api_key,
        "seed": args.seed,
    }
    opts.update({k: v for k, v in simple.items() if v is not None})
    opts.update({k: getattr(args, k) for k in _FAULT_FIELDS if getattr(args, k) is not None})
    if args.no_base64:
        opts["supports_base64"] = False
    if args.auto_truncate:
        opts["auto_truncate"] = True
    if args.precomputed:
        opts["precomputed"] = True
    opts["host"] = args.host
    if args.port or "port" not in opts:
        opts["port"] = args.port

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    srv = TEIServer(**opts).start()
    print(srv.url, flush=True)
    try:
        while not done.wait(3600):
            pass
    finally:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
