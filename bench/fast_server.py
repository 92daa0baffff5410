"""A lean stand-in for an embedding server, for client benchmarks: answers are cached bodies, sent at once.

Why not ``tweet_embed.testing.server``'s fast mode: that one still runs aiohttp's server and validates every
request the way TEI does, ~180 µs of CPU per request, which on a 2-core machine is CPU taken from the client
being measured. This one parses the request body once (to count the inputs) and writes a body rendered by
the test server at start-up (the same bytes the test server sends: TEI ``/embed`` JSON floats and
OpenAI ``/v1/embeddings`` base64), over keep-alive HTTP/1.1 parsed by httptools. It serves ``GET /info``
(TEI's document, so clients learn batch size and concurrency the same way) and ``GET /v1/models``;
the test server's counters route reports requests served. No faults, no validation: a benchmark fixture
only. The child process is run by the test server's own :class:`~tweet_embed.testing.server.ServerProcess`.

    with FastServer.spawn(dim=1024, cpus={1}) as srv:
        srv.embed_url, srv.openai_url, srv.counters["requests"]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Iterable

import httptools
import orjson

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

from tweet_embed.testing.server import CONTROL_PREFIX, ServerProcess, TEIServer  # noqa: E402

COUNTERS_PATH = (CONTROL_PREFIX + "/counters").encode()


class _Handler(asyncio.Protocol):
    def __init__(self, app: App) -> None:
        self.app = app
        self.parser = httptools.HttpRequestParser(self)
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_begin(self) -> None:
        self.body = []

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status, payload = self.app.answer(self.parser.get_method(), self.url, b"".join(self.body))
        head = b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
            status,
            len(payload),
        )
        assert self.transport is not None
        self.transport.writelines([head, payload])


class App:
    def __init__(self, dim: int, batch: int) -> None:
        srv = TEIServer(dim=dim, precomputed=True, max_client_batch_size=batch)
        self.info = orjson.dumps(srv.info())
        self.models = orjson.dumps({"object": "list", "data": [{"id": srv.model_id, "object": "model"}]})
        texts = [f"t{i}" for i in range(batch)]
        self.embed = [b""] + [srv._answer(texts[:n], True, "float", False, "ok") for n in range(1, batch + 1)]
        self.b64 = [b""] + [srv._answer(texts[:n], True, "base64", True, "ok") for n in range(1, batch + 1)]
        self.batch = batch
        self.requests = 0

    def answer(self, method: bytes, url: bytes, body: bytes) -> tuple[int, bytes]:
        path = url.split(b"?", 1)[0]
        if method == b"POST":
            req = orjson.loads(body)
            if path == b"/embed":
                inputs, cache = req["inputs"], self.embed
            elif path == b"/v1/embeddings":
                inputs, cache = req["input"], self.b64
            else:
                return 404, b'{"error":"not found"}'
            n = 1 if isinstance(inputs, str) else len(inputs)
            if not 1 <= n <= self.batch:
                return 422, b'{"error":"batch size","error_type":"Validation"}'
            self.requests += 1
            return 200, cache[n]
        if path == b"/info":
            return 200, self.info
        if path == b"/v1/models":
            return 200, self.models
        if path == COUNTERS_PATH:
            return 200, orjson.dumps({"counters": {"requests": self.requests}})
        return 404, b'{"error":"not found"}'


class FastServer(ServerProcess):
    """The server in a child process (optionally pinned to ``cpus``); a context manager."""

    def __init__(self, dim: int, cpus: Iterable[int] | None = None, batch: int = 32) -> None:
        super().__init__({"dim": dim, "batch": batch}, cpus=cpus)

    @classmethod
    def spawn(cls, dim: int, cpus: Iterable[int] | None = None, batch: int = 32) -> FastServer:
        return cls(dim, cpus, batch).start()  # type: ignore[return-value]

    def command(self) -> list[str]:
        o = self.options
        return [sys.executable, os.path.abspath(__file__), "--dim", str(o["dim"]), "--batch", str(o["batch"])]


async def _serve(dim: int, batch: int, port: int) -> None:
    app = App(dim, batch)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Handler(app), "127.0.0.1", port, backlog=1024)
    print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=32, help="max_client_batch_size announced and enforced")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    asyncio.run(_serve(args.dim, args.batch, args.port))


if __name__ == "__main__":
    main()
