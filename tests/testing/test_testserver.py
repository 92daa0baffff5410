"""The TEI test server answers like TEI 1.9.3 and misbehaves on request (real HTTP on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import numpy as np
import pytest

from tweet_embed.testing.server import TEIServer, approx_tokens, expected_vector, expected_vectors

DIM = 32


def call(
    url: str,
    payload: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, str, bytes]:
    """POST JSON (or raw bytes) or GET; returns (status, content type, body) for any status."""
    data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else None)
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def as_f32(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


@pytest.fixture(scope="module")
def srv():
    with TEIServer(dim=DIM) as s:
        yield s


@pytest.fixture
def fresh():
    with TEIServer(dim=DIM, seed=1) as s:
        yield s


def test_health_and_info(srv):
    assert call(srv.url + "/health")[0] == 200
    status, ctype, body = call(srv.url + "/info")
    assert status == 200 and ctype.startswith("application/json")
    info = json.loads(body)
    assert info["version"] == "1.9.3"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_client_batch_size"] == 32
    assert info["max_concurrent_requests"] == 512
    assert info["max_input_length"] == 512
    for key in (
        "model_id",
        "model_dtype",
        "max_batch_tokens",
        "auto_truncate",
        "tokenization_workers",
        "served_model_name",
    ):
        assert key in info


def test_info_is_configurable():
    with TEIServer(dim=8, version="1.8.2", max_client_batch_size=7, model_id="m/x") as s:
        info = json.loads(call(s.url + "/info")[2])
    assert (info["version"], info["max_client_batch_size"], info["model_id"]) == ("1.8.2", 7, "m/x")


def test_embed_shapes_and_each_text_gets_its_own_vector(srv):
    status, _, body = call(srv.embed_url, {"inputs": "hello"})
    assert status == 200
    single = json.loads(body)
    assert len(single) == 1 and len(single[0]) == DIM  # a single string still answers [[...]]
    texts = ["hello", "world", "ça va 🙂", ""]
    status, _, body = call(srv.embed_url, {"inputs": texts})
    vecs = as_f32(json.loads(body))
    assert vecs.shape == (4, DIM)
    # bit-exact: float32 JSON round trip, and the same vector whatever batch it came in
    assert np.array_equal(vecs[0], as_f32(single)[0])
    for t, v in zip(texts, vecs, strict=True):
        assert np.array_equal(v, expected_vector(t, DIM))
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
    assert not np.array_equal(vecs[0], vecs[1])
    status, _, body = call(srv.embed_url, {"inputs": texts, "normalize": False})
    raw = as_f32(json.loads(body))
    assert np.array_equal(raw, expected_vectors(texts, DIM, normalize=False))
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)


def test_expected_vectors_do_not_depend_on_batching():
    texts = [f"tweet {i}" for i in range(700)]
    full = expected_vectors(texts, 384)
    assert full.dtype == np.float32 and full.shape == (700, 384)
    assert np.array_equal(full[3:40], expected_vectors(texts[3:40], 384))
    assert np.array_equal(full[699], expected_vector(texts[699], 384))


@pytest.mark.parametrize("version,status", [("1.9.3", 422), ("1.9.0", 422), ("1.8.3", 413), ("1.5.0", 413)])
def test_batch_too_large_status_depends_on_version(version, status):
    with TEIServer(dim=DIM, version=version, max_client_batch_size=4) as s:
        code, ctype, body = call(s.embed_url, {"inputs": ["a"] * 5})
        assert code == status and ctype.startswith("application/json")
        err = json.loads(body)
        assert err["error_type"] == "Validation"
        assert "batch size 5 > maximum allowed batch size 4" in err["error"]
        assert call(s.embed_url, {"inputs": ["a"] * 4})[0] == 200
        assert s.counters[str(status)] == 1


def test_payload_limit_is_plain_text_413(srv):
    # truncate=True so that only the body size matters
    under = json.dumps({"inputs": ["x" * 60_000] * 30, "truncate": True}).encode()
    assert len(under) < 2_000_000
    assert call(srv.embed_url, raw=under)[0] == 200
    over = json.dumps({"inputs": ["x" * 70_000] * 30, "truncate": True}).encode()
    assert len(over) > 2_000_000
    status, ctype, body = call(srv.embed_url, raw=over)
    assert status == 413 and ctype.startswith("text/plain")
    assert body == b"Failed to buffer the request body: length limit exceeded"


def test_lone_surrogate_is_a_400_json_parse_error(srv):
    raw = b'{"inputs": ["ok", "bad \\ud83d here"]}'
    status, ctype, body = call(srv.embed_url, raw=raw)
    assert status == 400 and ctype.startswith("text/plain")
    assert body.startswith(b"Failed to parse the request body as JSON")
    # a proper surrogate pair is fine
    assert call(srv.embed_url, raw=b'{"inputs": ["\\ud83d\\ude00"]}')[0] == 200


def test_framework_errors(srv):
    assert call(srv.embed_url, raw=b"{not json")[0] == 400
    status, ctype, body = call(srv.embed_url, {"text": "no inputs"})
    assert status == 422 and ctype.startswith("text/plain") and b"missing field `inputs`" in body
    assert call(srv.embed_url, {"inputs": 5})[0] == 422
    req = urllib.request.Request(srv.embed_url, data=b'{"inputs": "a"}', method="POST")
    req.add_header("Content-Type", "text/plain")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 415


def test_empty_batch(srv):
    status, _, body = call(srv.embed_url, {"inputs": []})
    assert status == 400
    assert json.loads(body) == {"error": "`inputs` cannot be empty", "error_type": "Empty"}


def test_too_many_tokens_unless_truncated(srv):
    long = " ".join(["word"] * 600)
    assert approx_tokens(long) > 512
    status, _, body = call(srv.embed_url, {"inputs": ["short", long], "truncate": False})
    assert status == 422
    err = json.loads(body)
    assert err["error_type"] == "Validation"
    assert err["error"].startswith("Input validation error: `inputs` must have less than 512 tokens")
    status, _, body = call(srv.embed_url, {"inputs": ["short", long], "truncate": True})
    assert status == 200 and len(json.loads(body)) == 2


def test_openai_route_float_and_base64(srv):
    texts = ["alpha", "beta", "gamma"]
    status, _, body = call(srv.openai_url, {"input": texts, "model": "whatever"})
    assert status == 200
    doc = json.loads(body)
    assert doc["object"] == "list" and doc["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert [d["index"] for d in doc["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" for d in doc["data"])
    assert doc["usage"]["prompt_tokens"] == doc["usage"]["total_tokens"] == sum(map(approx_tokens, texts))
    floats = as_f32([d["embedding"] for d in doc["data"]])
    status, _, body = call(srv.openai_url, {"input": texts, "encoding_format": "base64"})
    assert status == 200
    b64 = np.stack(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in json.loads(body)["data"]]
    )
    assert np.array_equal(b64, floats)
    assert np.array_equal(floats, expected_vectors(texts, DIM))
    status, _, body = call(srv.openai_url, {"input": "one"})
    assert status == 200 and len(json.loads(body)["data"]) == 1


def test_openai_error_shape(srv):
    status, _, body = call(srv.openai_url, {"input": ["a"] * 33})
    assert status == 422
    assert json.loads(body) == {
        "message": "batch size 33 > maximum allowed batch size 32",
        "code": 422,
        "error_type": "Validation",
    }


def test_base64_unsupported_is_422():
    with TEIServer(dim=DIM, supports_base64=False) as s:
        status, ctype, body = call(s.openai_url, {"input": ["a"], "encoding_format": "base64"})
        assert status == 422 and ctype.startswith("text/plain") and b"unknown variant `base64`" in body
        assert call(s.openai_url, {"input": ["a"], "encoding_format": "float"})[0] == 200


def test_api_key():
    with TEIServer(dim=DIM, api_key="s3cret") as s:
        assert call(s.embed_url, {"inputs": "a"})[0] == 401
        assert call(s.embed_url, {"inputs": "a"}, headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(s.url + "/info")[0] == 401
        assert call(s.url + "/health")[0] == 200  # health stays public, as in TEI
        auth = {"Authorization": "Bearer s3cret"}
        assert call(s.embed_url, {"inputs": "a"}, headers=auth)[0] == 200
        assert call(s.openai_url, {"input": "a"}, headers=auth)[0] == 200
        assert s.counters["401"] == 3


def test_faults_at_probability_one(fresh):
    s = fresh
    s.set_faults(p_429=1.0)
    status, _, body = call(s.embed_url, {"inputs": ["a"]})
    assert status == 429 and json.loads(body) == {"error": "Model is overloaded", "error_type": "Overloaded"}
    status, _, body = call(s.openai_url, {"input": ["a"]})
    assert status == 429 and json.loads(body)["code"] == 429
    s.set_faults(p_429=0.0, p_503=1.0)
    assert call(s.embed_url, {"inputs": ["a"]})[0] == 503
    s.set_faults(p_503=0.0, p_bad_count=1.0)
    assert len(json.loads(call(s.embed_url, {"inputs": ["a", "b", "c"]})[2])) == 2
    assert len(json.loads(call(s.embed_url, {"inputs": "a"})[2])) == 2
    s.set_faults(p_bad_count=0.0, p_bad_dim=1.0)
    assert {len(v) for v in json.loads(call(s.embed_url, {"inputs": ["a", "b"]})[2])} == {DIM - 1}
    s.set_faults(p_bad_dim=0.0, p_nan=1.0)
    vecs = json.loads(call(s.embed_url, {"inputs": ["a", "b"]})[2])
    assert vecs[0][0] is None and None not in vecs[1]  # NaN serialises as null, as serde_json does
    body = call(s.openai_url, {"input": ["a"], "encoding_format": "base64"})[2]
    assert np.isnan(np.frombuffer(base64.b64decode(json.loads(body)["data"][0]["embedding"]), "<f4")[0])
    s.set_faults(p_nan=0.0)
    assert call(s.embed_url, {"inputs": ["a"]})[0] == 200
    c = s.counters
    assert (c["429"], c["503"], c["bad_count"], c["bad_dim"], c["nan"], c["ok"]) == (2, 1, 2, 1, 2, 1)
    assert s.embedded == {"a": 1}  # faulty answers do not count as embedded


def test_drop_and_hang(fresh):
    s = fresh
    s.set_faults(p_drop=1.0)
    with pytest.raises((ConnectionError, urllib.error.URLError, OSError)) as e:
        call(s.embed_url, {"inputs": ["a"]})
    assert not isinstance(e.value, (urllib.error.HTTPError, TimeoutError, socket.timeout))
    s.set_faults(p_drop=0.0, p_hang=1.0)
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        call(s.embed_url, {"inputs": ["a"]}, timeout=0.5)
    s.set_faults(p_hang=0.0)
    assert call(s.embed_url, {"inputs": ["a"]})[0] == 200
    assert (s.counters["dropped"], s.counters["hung"], s.counters["ok"]) == (1, 1, 1)


def test_queue_faults_script_exact_outcomes(fresh):
    s = fresh
    s.queue_faults("503", "429", "ok", "bad_dim")
    codes = [call(s.embed_url, {"inputs": ["a"]})[0] for _ in range(5)]
    assert codes == [503, 429, 200, 200, 200]
    assert s.counters["bad_dim"] == 1 and s.counters["ok"] == 2


def test_seeded_faults_are_reproducible():
    def run(seed: int) -> list[int]:
        with TEIServer(dim=DIM, seed=seed, p_503=0.5) as s:
            return [call(s.embed_url, {"inputs": ["a"]})[0] for _ in range(20)]

    first = run(7)
    assert first == run(7)
    assert {200, 503} == set(first)


def test_overload_with_latency():
    async def go(s: TEIServer) -> list[int]:
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> int:
                async with session.post(s.embed_url, json={"inputs": [f"t{i}", "x", "y"]}) as r:
                    await r.read()
                    return r.status

            return await asyncio.gather(*(one(i) for i in range(3)))

    with TEIServer(dim=DIM, max_concurrent_requests=7, latency=0.4) as s:
        statuses = asyncio.run(go(s))
        assert sorted(statuses) == [200, 200, 429]
        assert s.counters["overloaded"] == 1 and s.counters["max_in_flight_requests"] == 2


def test_async_context_manager_and_route_aliases():
    async def go() -> None:
        async with TEIServer(dim=DIM) as s, aiohttp.ClientSession() as session:
            async with session.post(s.url + "/embeddings", json={"input": ["a"]}) as r:
                assert r.status == 200 and len((await r.json())["data"]) == 1
            async with session.post(s.url + "/", json={"inputs": ["a"]}) as r:
                assert r.status == 200 and len(await r.json()) == 1

    asyncio.run(go())


def test_counters_track_each_text(fresh):
    s = fresh
    call(s.embed_url, {"inputs": ["a", "b"]})
    call(s.openai_url, {"input": ["b"]})
    assert s.embedded == {"a": 1, "b": 2}
    c = s.counters
    assert (c["requests"], c["ok"], c["texts"], c["max_batch"]) == (2, 2, 3, 2)
    s.reset_counters()
    assert s.counters["ok"] == 0 and not s.embedded


def test_precomputed_mode_ignores_texts():
    with TEIServer(dim=DIM, precomputed=True) as s:
        a = json.loads(call(s.embed_url, {"inputs": ["a", "b"]})[2])
        b = json.loads(call(s.embed_url, {"inputs": ["c", "d"]})[2])
        assert a == b and len(a) == 2 and len(a[0]) == DIM
        assert call(s.embed_url, {"inputs": ["a"] * 33})[0] == 422  # still validated
        assert s.counters["texts"] == 4 and not s.embedded


def test_stop_refuses_connections():
    s = TEIServer(dim=DIM).start()
    assert call(s.embed_url, {"inputs": "a"})[0] == 200
    s.stop()
    with pytest.raises(urllib.error.URLError) as e:
        call(s.embed_url, {"inputs": "a"}, timeout=2)
    assert isinstance(e.value.reason, ConnectionRefusedError)
    s.stop()  # idempotent


def test_dead_then_back_on_same_port(fresh):
    s = fresh
    url = s.url
    s.set_faults(dead=True)
    with pytest.raises(urllib.error.URLError) as e:
        call(s.embed_url, {"inputs": "a"}, timeout=2)
    assert isinstance(e.value.reason, ConnectionRefusedError)
    s.set_faults(dead=False)
    assert s.url == url and call(s.embed_url, {"inputs": "a"})[0] == 200


def test_dead_revives_by_itself(fresh):
    fresh.set_faults(dead=True, revive_after=0.3)
    with pytest.raises(urllib.error.URLError):
        call(fresh.url + "/health", timeout=2)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert call(fresh.url + "/health", timeout=2)[0] == 200
            break
        except urllib.error.URLError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_stop_drops_requests_in_flight():
    async def go(s: TEIServer) -> None:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.post(s.embed_url, json={"inputs": "a"}))
            s.queue_faults("ok", "hang")
            hung = asyncio.ensure_future(session.post(s.embed_url, json={"inputs": "b"}))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(s.stop)
            for fut in (slow, hung):
                with pytest.raises(aiohttp.ClientError):
                    await asyncio.wait_for(fut, 5)

    asyncio.run(go(TEIServer(dim=DIM, latency=30).start()))


def test_dead_closes_keepalive_connections(fresh):
    async def go(s: TEIServer) -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(s.embed_url, json={"inputs": "a"}) as r:
                assert r.status == 200
            await asyncio.to_thread(s.set_faults, dead=True)
            with pytest.raises(aiohttp.ClientError):
                async with session.post(s.embed_url, json={"inputs": "a"}) as r:
                    await r.read()

    asyncio.run(go(fresh))


def test_spawned_process():
    with TEIServer.spawn_process(dim=DIM, max_client_batch_size=8) as p:
        status, _, body = call(p.embed_url, {"inputs": ["a", "b"]})
        assert status == 200
        assert np.array_equal(as_f32(json.loads(body)), expected_vectors(["a", "b"], DIM))
        assert json.loads(call(p.url + "/info")[2])["max_client_batch_size"] == 8
        p.set_faults(p_503=1.0)
        assert call(p.embed_url, {"inputs": ["a"]})[0] == 503
        p.set_faults(p_503=0.0)
        p.queue_faults("429")
        assert call(p.embed_url, {"inputs": ["a"]})[0] == 429
        c = p.counters
        assert (c["ok"], c["503"], c["429"]) == (1, 1, 1)
        url = p.url
    with pytest.raises(urllib.error.URLError):
        call(url + "/health", timeout=2)
