"""The hot-path HTTP/1.1 client against real local servers: the TEI test server, and a raw asyncio server that
answers in every framing HTTP/1.1 allows and fails in the ways real servers and networks do."""

from __future__ import annotations

import asyncio
import base64
import gzip
import socket
from collections.abc import Awaitable, Callable

import orjson
import pytest

from tweet_embed.backends.h1 import ConnectError, H1Client, ProtocolError, ServerDisconnected, Target
from tweet_embed.testing.server import TEIServer

pytestmark = pytest.mark.timeout(60)

Action = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict], Awaitable[None]]


class RawServer:
    """Reads one request at a time, records it, and lets the test's ``action`` write the answer bytes."""

    def __init__(self, action: Action) -> None:
        self.action = action
        self.requests: list[dict] = []
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/embed"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                req = {"line": lines[0], "headers": headers, "body": body, "n": len(self.requests)}
                self.requests.append(req)
                await self.action(reader, writer, req)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(body: bytes, *extra: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def ok_json(reader, writer, req) -> None:
    writer.write(answer(b'{"n": %d}' % req["n"]))
    await writer.drain()


def run(coro):
    return asyncio.run(coro)


def test_against_the_tei_server_reuses_one_connection() -> None:
    async def main() -> None:
        async with TEIServer(dim=8) as srv:
            client = H1Client(headers={"Content-Type": "application/json"})  # TEI answers 415 without it
            try:
                for _ in range(5):
                    status, body = await client.request(
                        "POST", srv.embed_url, orjson.dumps({"inputs": ["a", "b"]})
                    )
                    assert status == 200
                    vectors = orjson.loads(body)
                    assert len(vectors) == 2 and len(vectors[0]) == 8
                status, body = await client.request("GET", srv.url + "/info")
                assert status == 200 and orjson.loads(body)["max_client_batch_size"] > 0
                status, body = await client.request("POST", srv.embed_url, b"{not json")
                assert status in (400, 422)
                # sequential requests: every one went over the same idle connection
                assert sum(len(q) for q in client._idle.values()) == 1
            finally:
                await client.close()

    run(main())


def test_request_bytes_and_keepalive() -> None:
    async def main() -> None:
        async with RawServer(ok_json) as srv:
            client = H1Client(headers={"Content-Type": "application/json", "Authorization": "Bearer k"})
            for i in range(3):
                status, body = await client.request("POST", srv.url, b'{"x": 1}')
                assert (status, orjson.loads(body)) == (200, {"n": i})
            await client.close()
        assert srv.connections == 1
        req = srv.requests[0]
        assert req["line"] == "POST /embed HTTP/1.1"
        assert req["headers"]["host"] == f"127.0.0.1:{srv.port}"
        assert req["headers"]["authorization"] == "Bearer k"
        assert req["headers"]["content-type"] == "application/json"
        assert req["body"] == b'{"x": 1}'

    run(main())


def test_concurrent_requests_use_separate_connections() -> None:
    async def slow(reader, writer, req) -> None:
        await asyncio.sleep(0.05)
        await ok_json(reader, writer, req)

    async def main() -> None:
        async with RawServer(slow) as srv:
            client = H1Client()
            got = await asyncio.gather(*[client.request("POST", srv.url, b"{}") for _ in range(4)])
            assert sorted(orjson.loads(b)["n"] for _, b in got) == [0, 1, 2, 3]
            await client.close()
        assert srv.connections == 4

    run(main())


def test_chunked_close_delimited_and_gzip_bodies() -> None:
    payload = orjson.dumps({"data": list(range(5000))})

    async def framing(reader, writer, req) -> None:
        if req["n"] == 0:  # chunked, in several pieces
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(0, len(payload), 7000):
                piece = payload[i : i + 7000]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif req["n"] == 1:  # gzip
            z = gzip.compress(payload)
            writer.write(answer(z, "Content-Encoding: gzip"))
        else:  # no length: the body ends when the server closes
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + payload)
            await writer.drain()
            writer.close()
        await writer.drain()

    async def main() -> None:
        async with RawServer(framing) as srv:
            client = H1Client()
            for _ in range(3):
                status, body = await client.request("POST", srv.url, b"{}")
                assert status == 200 and body == payload
            assert not any(client._idle.values())  # the closed one is not kept
            status, body = await client.request("POST", srv.url, b"{}")
            assert body == payload
            await client.close()
        assert srv.connections == 2

    run(main())


def test_connection_close_header_is_honoured() -> None:
    async def closing(reader, writer, req) -> None:
        writer.write(answer(b"{}", "Connection: close"))
        await writer.drain()

    async def main() -> None:
        async with RawServer(closing) as srv:
            client = H1Client()
            for _ in range(3):
                assert (await client.request("POST", srv.url, b"{}"))[0] == 200
            await client.close()
        assert srv.connections == 3

    run(main())


def test_idle_connection_closed_by_the_server_is_retried_on_a_fresh_one() -> None:
    """The server answers, then closes the idle connection without saying so (keep-alive timeout): the next
    request must not fail; it goes over a new connection."""

    async def answer_then_close(reader, writer, req) -> None:
        writer.write(answer(b"{}"))
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with RawServer(answer_then_close) as srv:
            client = H1Client()
            assert (await client.request("POST", srv.url, b"{}"))[0] == 200
            await asyncio.sleep(0.05)  # the close reaches the client: the idle connection is dropped
            assert (await client.request("POST", srv.url, b"{}"))[0] == 200
            await client.close()
        assert srv.connections == 2 and len(srv.requests) == 2

    run(main())


def test_reused_connection_dying_before_the_answer_is_tried_once_more() -> None:
    """A connection the server drops right when it is reused (the close races the request): one silent retry."""

    async def drop_second(reader, writer, req) -> None:
        if req["n"] == 1:
            writer.transport.abort()  # no answer at all
            return
        await ok_json(reader, writer, req)

    async def main() -> None:
        async with RawServer(drop_second) as srv:
            client = H1Client()
            assert (await client.request("POST", srv.url, b"{}"))[0] == 200
            status, body = await client.request("POST", srv.url, b"{}")
            assert status == 200 and orjson.loads(body) == {"n": 2}
            await client.close()
        assert srv.connections == 2

    run(main())


def test_fresh_connection_dropped_raises() -> None:
    async def drop(reader, writer, req) -> None:
        writer.transport.abort()

    async def main() -> None:
        async with RawServer(drop) as srv:
            client = H1Client()
            with pytest.raises(ServerDisconnected, match="before answering"):
                await client.request("POST", srv.url, b"{}")
            await client.close()
        assert len(srv.requests) == 1  # a fresh connection is not retried: the pool's retry policy decides

    run(main())


def test_answer_cut_short_raises_and_is_not_reused() -> None:
    async def cut(reader, writer, req) -> None:
        if req["n"] == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"[" * 10)
            await writer.drain()
            writer.transport.abort()
            return
        await ok_json(reader, writer, req)

    async def main() -> None:
        async with RawServer(cut) as srv:
            client = H1Client()
            with pytest.raises(ServerDisconnected, match="during the answer"):
                await client.request("POST", srv.url, b"{}")
            assert (await client.request("POST", srv.url, b"{}"))[0] == 200
            await client.close()
        assert srv.connections == 2

    run(main())


def test_garbage_answer_is_a_protocol_error() -> None:
    async def garbage(reader, writer, req) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with RawServer(garbage) as srv:
            client = H1Client()
            with pytest.raises(ProtocolError):
                await client.request("POST", srv.url, b"{}")
            await client.close()

    run(main())


def test_timeout_bounds_the_whole_request() -> None:
    async def hang(reader, writer, req) -> None:
        await asyncio.sleep(30)

    async def main() -> None:
        async with RawServer(hang) as srv:
            client = H1Client(timeout=0.3)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                await client.request("POST", srv.url, b"{}")
            assert loop.time() - t0 < 5
            assert not any(client._idle.values())  # a timed-out connection is closed, never reused
            await client.close()

    run(main())


def test_cancelled_request_closes_its_connection() -> None:
    async def slow(reader, writer, req) -> None:
        await asyncio.sleep(0.5)
        await ok_json(reader, writer, req)

    async def main() -> None:
        async with RawServer(slow) as srv:
            client = H1Client()
            task = asyncio.ensure_future(client.request("POST", srv.url, b"{}"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # its late answer cannot be mistaken for the next request's: that one gets a new connection
            status, body = await client.request("POST", srv.url, b"{}")
            assert status == 200 and orjson.loads(body) == {"n": 1}
            await client.close()
        assert srv.connections == 2

    run(main())


def test_idle_connections_expire() -> None:
    async def main() -> None:
        async with RawServer(ok_json) as srv:
            client = H1Client(keepalive=0.05)
            await client.request("POST", srv.url, b"{}")
            await asyncio.sleep(0.15)
            await client.request("POST", srv.url, b"{}")
            await client.close()
        assert srv.connections == 2

    run(main())


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def main() -> None:
        client = H1Client()
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
            await client.request("POST", f"http://127.0.0.1:{port}/embed", b"{}")
        await client.close()

    run(main())


def test_url_credentials_become_basic_auth_unless_a_key_is_set() -> None:
    async def main() -> None:
        async with RawServer(ok_json) as srv:
            url = f"http://us%40er:p%3Ass@127.0.0.1:{srv.port}/v1/embeddings?x=1"
            plain = H1Client()
            await plain.request("POST", url, b"{}")
            keyed = H1Client(headers={"Authorization": "Bearer k"})
            await keyed.request("POST", url, b"{}")
            await plain.close()
            await keyed.close()
        first, second = srv.requests
        assert first["line"] == "POST /v1/embeddings?x=1 HTTP/1.1"
        assert first["headers"]["authorization"] == "Basic " + base64.b64encode(b"us@er:p:ss").decode()
        assert second["headers"]["authorization"] == "Bearer k"

    run(main())


def test_target_parsing() -> None:
    t = Target.parse("https://[::1]/v1/embeddings")
    assert (t.scheme, t.host, t.port, t.host_header, t.path) == (
        "https",
        "::1",
        443,
        "[::1]",
        "/v1/embeddings",
    )
    assert Target.parse("http://h:8080").path == "/"
    assert Target.parse("http://h:80/x").host_header == "h"
    with pytest.raises(ValueError):
        Target.parse("ftp://h/x")
