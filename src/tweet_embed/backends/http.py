"""What TEI's ``/embed`` and OpenAI's ``/v1/embeddings`` clients share: the connections, the pool, error mapping.

Requests go through :class:`tweet_embed.backends.h1.H1Client` (keep-alive HTTP/1.1 on asyncio, a third of
aiohttp's per-request CPU on these large answers).

Response bodies are decoded and validated by :mod:`tweet_embed.backends.decode`'s
:class:`~tweet_embed.backends.decode.DecodePool`: large JSON-float bodies in ``workers`` processes when there are
spare cores, the rest (base64, small bodies, or all on 2 cores) on the event loop, cheaper than any hand-over. The API key goes out as ``Authorization: Bearer`` on
every request (TEI's ``--api-key`` and OpenAI-compatible servers) and is never logged or shown in ``repr``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import orjson

from tweet_embed.backends.base import Backend, BackendError, BackendInfo
from tweet_embed.backends.decode import DecodePool, decode_embed_json
from tweet_embed.backends.h1 import H1Client, HTTPError
from tweet_embed.backends.pool import (
    BatchRefused,
    Endpoint,
    EndpointPool,
    FatalError,
    RetryableError,
    RetryPolicy,
    redact_url,
)
from tweet_embed.backends.vectors import VectorOptions, truncate

log = logging.getLogger("tweet_embed")

RETRYABLE_STATUS = {408, 409, 424, 425, 429, 500, 502, 503, 504}
REFUSED_STATUS = {400, 413, 422}
FATAL_STATUS = {
    401: "authentication failed (check TWEET_EMBED_API_KEY)",
    403: "forbidden",
    404: "not found (check the URL's path)",
    405: "method not allowed (check the URL's path)",
}


def choose_batch(requested: int | None, server_batch: int | None, default: int) -> int:
    """``--batch-size``, else the servers' smallest ``max_client_batch_size``, else ``default``; never above
    the servers' limit (a larger batch would be refused, 422/413, on every request)."""
    batch = requested or server_batch or default
    if server_batch is not None and batch > server_batch:
        log.warning(
            "--batch-size %d is above the servers' max_client_batch_size %d; using %d",
            batch,
            server_batch,
            server_batch,
        )
        batch = server_batch
    return batch


def describe_error(status: int, body: bytes) -> str:
    """A short message from an error body (JSON ``error``/``message`` or plain text), never the request."""
    try:
        obj = orjson.loads(body)
        if isinstance(obj, dict):
            msg = obj.get("error") or obj.get("message") or obj.get("detail")
            if isinstance(msg, dict):
                msg = msg.get("message")
            if msg:
                return f"HTTP {status}: {str(msg)[:200]}"
    except orjson.JSONDecodeError:
        pass
    text = body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status}: {text}" if text else f"HTTP {status}"


class HTTPBackend(Backend):
    """Base for the HTTP protocols: one connection pool, one endpoint pool, one decode executor."""

    kind = "http"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        normalize: bool = True,
        api_key: str | None = None,
        model: str | None = None,
        batch_size: int | None = None,
        request_timeout: float = 60.0,
        max_retry_time: float = 600.0,
        insecure: bool = False,
        decode_executor: Executor | None = None,
        workers: int | None = None,
        options: VectorOptions | None = None,
    ) -> None:
        """``workers``: decode processes (None, 0 or 1: none, decode on the loop); a given
        ``decode_executor`` runs every decode instead. ``options``: prompt and dimensions."""
        if not urls:
            raise ValueError("no server URL given")
        self.urls = [self.normalise_url(u) for u in urls]
        self.normalize = normalize
        self._api_key = api_key
        self.model = model
        self.batch_size = batch_size
        self.request_timeout = request_timeout
        self.insecure = insecure
        self.decode_executor = decode_executor
        self.decoder = DecodePool(1 if workers is None else workers)
        self._decoder_started = False
        self._decoder_lock = asyncio.Lock()
        self.pool = EndpointPool([Endpoint(u) for u in self.urls], RetryPolicy(max_retry_time=max_retry_time))
        self.session: H1Client | None = None
        self.info_: BackendInfo | None = None
        self.options = options or VectorOptions()
        # a server that answered the full width despite ``dimensions``: its width, cut here to the asked one
        self._wire_dim: int | None = None

    @staticmethod
    def normalise_url(url: str) -> str:
        return url.rstrip("/")

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    async def _open(self) -> H1Client:
        if self.session is None:
            ctx = None  # loading the system's CA certificates costs ~20 ms: only for https:// URLs
            if any(u.startswith("https:") for u in self.urls):
                ctx = ssl.create_default_context()
                if self.insecure:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
            self.session = H1Client(
                ssl_context=ctx,
                timeout=self.request_timeout,
                connect_timeout=min(10.0, self.request_timeout),
                headers=self.headers(),
            )
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self._decoder_started:
            self._decoder_started = False
            await asyncio.to_thread(self.decoder.close)

    async def _start_decoder(self) -> None:
        async with self._decoder_lock:
            if not self._decoder_started:
                if self.decode_executor is None:
                    await self.decoder.start()
                self._decoder_started = True

    async def decode(self, kind: str, body: bytes, n: int, dim: int | None) -> np.ndarray:
        """Decode one answer off the loop (see :mod:`tweet_embed.backends.decode`)."""
        if not self._decoder_started:
            await self._start_decoder()
        if self.decode_executor is not None:
            from tweet_embed.backends.decode import DECODERS

            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.decode_executor, DECODERS[kind], body, n, dim)
        try:
            return await self.decoder.decode(kind, body, n, dim)
        except BrokenProcessPool as exc:
            raise BackendError(f"a decode worker process died ({exc}); re-run to resume") from exc

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}({[redact_url(u) for u in self.urls]})"

    async def get_json(self, url: str) -> Any | None:
        """GET a JSON document (``/info``, ``/v1/models``); None when the server has no such route."""
        session = await self._open()
        try:
            status, body = await session.request("GET", url)
        except (HTTPError, asyncio.TimeoutError, OSError):
            return None
        if status in (401, 403):
            raise FatalError(f"{redact_url(url)}: {FATAL_STATUS[status]}")
        if status != 200:
            return None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            return None

    async def post(self, ep: Endpoint, path_url: str, payload: bytes) -> bytes:
        """POST and return the 200 body; map every failure onto retry / split / fatal."""
        session = await self._open()
        try:
            status, body = await session.request("POST", path_url, payload)
        except asyncio.TimeoutError as exc:
            raise RetryableError(
                "timeout", f"{ep.name}: no answer within {self.request_timeout:.0f}s"
            ) from exc
        except (HTTPError, OSError) as exc:
            raise RetryableError("connection", f"{ep.name}: {type(exc).__name__}: {exc}") from exc
        if status == 200:
            return body
        msg = f"{ep.name}: {describe_error(status, body)}"
        if status in REFUSED_STATUS:
            raise BatchRefused(msg)
        if status in FATAL_STATUS:
            raise FatalError(f"{ep.name}: {FATAL_STATUS[status]} ({describe_error(status, body)})")
        if status in RETRYABLE_STATUS or status >= 500:
            raise RetryableError(str(status), msg)
        raise FatalError(msg)

    async def request_vectors(
        self,
        texts: Sequence[str],
        build: Callable[[Endpoint], tuple[str, bytes]],
        kind: str,
    ) -> np.ndarray:
        """One batch through the pool: send, decode off the loop (``kind`` names the decoder in
        :data:`tweet_embed.backends.decode.DECODERS`), validate, retry bad answers elsewhere."""
        n = len(texts)
        dim = self._wire_dim or (self.info_.dim if self.info_ else None)

        async def attempt(ep: Endpoint) -> np.ndarray:
            url, payload = build(ep)
            body = await self.post(ep, url, payload)
            try:
                return await self.decode(kind, body, n, dim)
            except (ValueError, TypeError, KeyError, IndexError) as exc:
                raise RetryableError("bad_answer", f"{ep.name}: {exc}") from exc

        vectors = await self.pool.call(n, attempt)
        if self._wire_dim is not None and self.options.dimensions is not None:
            return truncate(vectors, self.options.dimensions, self.normalize)
        return vectors

    async def probe_width(self, probe: Callable[[bool], Any], model: str) -> int:
        """The width of this run's vectors, checked before any work: ``probe(with_dimensions)`` embeds one text.

        Without ``--dimensions``: the model's width. With it: N above the model's width is an error; a server
        that answers the full width anyway (one that ignores the field) gets its vectors cut here, with one
        warning; any other width is an error.
        """
        try:
            full = int((await probe(False)).shape[1])
            want = self.options.dimensions
            if want is None:
                return full
            self.options.check_width(full, model)
            got = int((await probe(True)).shape[1])
        except BatchRefused as exc:  # e.g. an unknown prompt name: TEI answers 422 with the known ones
            raise BackendError(f"the server refused the request: {exc}") from None
        if got == want:
            return want
        if got == full:
            log.warning(
                "the server ignores `dimensions` (answers %d dimensions): cutting to %d here, renormalised",
                full,
                want,
            )
            self._wire_dim = full
            return want
        raise BackendError(f"asked the server for {want} dimensions, it answered {got}")

    def stats(self) -> dict[str, int]:
        return {f"retry_{k}": v for k, v in sorted(self.pool.retries.items())}

    def waiting_note(self, after: float = 5.0) -> str | None:
        return self.pool.waiting_note(after)

    def endpoints(self) -> list[Endpoint]:
        return list(self.pool.endpoints)

    def require_info(self) -> BackendInfo:
        if self.info_ is None:
            raise BackendError("backend not started")
        return self.info_


decode_float_lists = decode_embed_json  # the earlier name
