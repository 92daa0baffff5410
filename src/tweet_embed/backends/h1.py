"""A small HTTP/1.1 keep-alive client for the embedding hot path: send a request, get ``(status, body)``.

Why not aiohttp: measured on this project's 2-core machine against a server answering from memory,
aiohttp spent 8-21 µs of client CPU per embedded document reading 150-400 KB answers of 32 vectors (its
stream reader, flow-control pauses and per-request machinery) while this client spends 2-7 µs
(``bench/client_ceiling.py``; the experiment is in docs/performance.md, "Throughput"). At 1,024 dimensions
that difference decides whether the client or the decoding is the limit.

What it does: one connection per request in flight, reused while the server keeps it alive (idle ones are
dropped after ``keepalive`` seconds, below uvicorn's 5-s default, so a reused connection is rarely one
the server is closing); parsing by ``httptools`` (llhttp, the parser uvicorn and aiohttp use): status,
``Content-Length``, chunked and close-delimited bodies, ``Connection: close``, gzip/deflate bodies;
HTTPS through ``ssl``; ``user:password@`` in the URL becomes Basic auth unless an ``Authorization`` header is
given. What it does not: proxies, redirects, HTTP/2 (embedding servers answer plain HTTP/1.1).

A request that fails on a reused connection before any byte of the answer arrived is tried once more on a
fresh connection (the server closed an idle connection at the moment it was reused; embedding is
idempotent). Every other failure raises :class:`HTTPError` (or ``TimeoutError``) for the caller's retry
policy.
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

__all__ = ["H1Client", "HTTPError", "ConnectError", "ServerDisconnected", "ProtocolError"]


class HTTPError(Exception):
    """The request failed below HTTP (no status to act on)."""


class ConnectError(HTTPError):
    """No connection could be made (refused, unknown host, TLS handshake or certificate failure)."""


class ServerDisconnected(HTTPError):
    """The connection closed before the whole answer arrived."""


class ProtocolError(HTTPError):
    """The server's bytes are not valid HTTP/1.1."""


@dataclass(frozen=True)
class Target:
    """A URL split once into what the connection and the request line need."""

    scheme: str
    host: str
    port: int
    path: str
    host_header: str
    basic_auth: str | None

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname or ''}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        auth = None
        if parts.username is not None or parts.password is not None:
            raw = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
            auth = "Basic " + base64.b64encode(raw).decode()
        return cls(parts.scheme, host, port, path, host_header, auth)


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and its response parser; answers one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.chunks: list[bytes] = []
        self.length_known = False  # Content-Length or chunked: else the body ends at EOF
        self.encoding = b""
        self.headers_done = False
        self.received = False  # any byte of the current answer
        self.closed = False
        self.keep_alive = True
        self.idle_since = 0.0

    # -------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for: the connection's state is unknown now
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP answer: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost finishes the answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if self.headers_done and not self.length_known:  # a close-delimited body ends here
            self.keep_alive = False
            self.on_message_complete()
            return
        what = "during the answer" if self.received else "before answering"
        detail = f": {exc}" if exc else ""
        self._fail(ServerDisconnected(f"server closed the connection {what}{detail}"))

    # ------------------------------------------------------------------ httptools

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-length":
            self.length_known = True
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            self.length_known = True
        elif lname == b"content-encoding":
            self.encoding = value.strip().lower()

    def on_headers_complete(self) -> None:
        self.headers_done = True
        if self.parser.get_status_code() in (204, 304):
            self.length_known = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        status = self.parser.get_status_code()
        self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            if self.encoding in (b"gzip", b"x-gzip"):
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            elif self.encoding == b"deflate":
                body = zlib.decompress(body)
        except zlib.error as exc:
            self._fail(ProtocolError(f"cannot decompress the {self.encoding.decode()} answer: {exc}"))
            return
        waiter.set_result((status, body))

    # ---------------------------------------------------------------------- own

    def _fail(self, exc: Exception) -> None:
        self.keep_alive = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def start(self, loop: asyncio.AbstractEventLoop, data: list[bytes]) -> asyncio.Future[tuple[int, bytes]]:
        """Send one request; the future resolves to (status, body)."""
        self.waiter = loop.create_future()
        self.chunks = []
        self.length_known = self.headers_done = self.received = False
        self.encoding = b""
        assert self.transport is not None
        self.transport.writelines(data)
        return self.waiter

    def finish(self) -> None:
        self.waiter = None

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class H1Client:
    """Keep-alive connections per host and port; one request per connection at a time.

    ``timeout`` bounds a whole request (connect, send, answer); ``connect_timeout`` the connection alone.
    """

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        keepalive: float = 4.0,
    ) -> None:
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.connect_timeout = min(connect_timeout, timeout)
        self.headers = dict(headers or {})
        self.keepalive = keepalive
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._busy: set[_Connection] = set()
        self._targets: dict[str, Target] = {}
        self._heads: dict[tuple[str, str], bytes] = {}

    def target(self, url: str) -> Target:
        t = self._targets.get(url)
        if t is None:
            t = self._targets[url] = Target.parse(url)
        return t

    def _head(self, method: str, url: str, t: Target) -> bytes:
        """Request line and fixed headers, built once per (method, URL); Content-Length is added per call."""
        key = (method, url)
        head = self._heads.get(key)
        if head is None:
            lines = [f"{method} {t.path} HTTP/1.1", f"Host: {t.host_header}", "Accept: application/json"]
            has_auth = any(k.lower() == "authorization" for k in self.headers)
            lines += [f"{k}: {v}" for k, v in self.headers.items()]
            if t.basic_auth and not has_auth:
                lines.append(f"Authorization: {t.basic_auth}")
            head = self._heads[key] = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        return head

    async def _connect(self, t: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        ctx = None
        if t.scheme == "https":
            ctx = self.ssl_context or ssl.create_default_context()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    _Connection, t.host, t.port, ssl=ctx, server_hostname=t.host if ctx else None
                ),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise ConnectError(
                f"cannot connect to {t.host_header}: no answer within {self.connect_timeout:.0f}s"
            ) from None
        except ssl.SSLError as exc:
            raise ConnectError(f"cannot connect to {t.host_header}: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            # asyncio's strerror is "Connect call failed (host, port)"; the errno says why (refused, unreachable)
            why = os.strerror(exc.errno) if exc.errno else (exc.strerror or exc)
            raise ConnectError(f"cannot connect to {t.host_header}: {why}") from exc
        return conn

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # most recently used first: the likeliest to be alive
            if not conn.closed and now - conn.idle_since < self.keepalive:
                return conn
            conn.close()
        return None

    async def request(self, method: str, url: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send ``body`` (JSON) and return ``(status, answer body)``; raises HTTPError or TimeoutError."""
        t = self.target(url)
        key = (t.scheme, t.host, t.port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        data = [self._head(method, url, t), b"%d\r\n\r\n" % len(body)]
        if body:
            data.append(body)
        conn = self._take_idle(key)
        reused = conn is not None
        for _ in range(2):
            if conn is None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise asyncio.TimeoutError()
                conn = await asyncio.wait_for(self._connect(t), remaining)
            try:
                status, answer = await self._exchange(loop, conn, data, deadline)
            except ServerDisconnected:
                if reused and not conn.received:
                    conn, reused = None, False  # closed while idle: once more on a fresh connection
                    continue
                raise
            if conn.keep_alive and not conn.closed:
                conn.idle_since = time.monotonic()
                self._idle.setdefault(key, deque()).append(conn)
            else:
                conn.close()
            return status, answer
        raise AssertionError("unreachable")

    async def _exchange(
        self, loop: asyncio.AbstractEventLoop, conn: _Connection, data: list[bytes], deadline: float
    ) -> tuple[int, bytes]:
        self._busy.add(conn)
        ok = False
        timer = None
        try:
            if conn.closed:
                raise ServerDisconnected("server closed the connection before answering")
            waiter = conn.start(loop, data)
            timer = loop.call_at(deadline, _expire, waiter)
            result = await waiter
            ok = True
            return result
        finally:
            if timer is not None:
                timer.cancel()
            conn.finish()
            self._busy.discard(conn)
            if not ok:
                conn.close()  # cancelled, timed out or failed mid-answer: its state is unknown

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
        self._busy.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())
