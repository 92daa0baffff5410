"""Response decoding: bit-exact vectors on the fast and the fallback paths, every bad answer refused, and the
decode pool (threads, processes) giving the same answers and dying with its parent."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orjson
import pytest

from tweet_embed.backends import decode
from tweet_embed.backends.decode import (
    DecodeError,
    DecodePool,
    decode_embed_json,
    decode_openai_base64,
    decode_openai_floats,
)
from tweet_embed.testing.server import expected_vectors


@pytest.fixture(params=["fast", "fallback"])
def path(request, monkeypatch) -> str:
    """Run each test with simdjson/pybase64 (when installed) and with the orjson/binascii fallbacks."""
    if request.param == "fallback":
        monkeypatch.setattr(decode, "_simdjson", None)
        monkeypatch.setattr(decode, "_b64decode", lambda s: base64.b64decode(s, validate=True))
    elif not decode.accelerators()["simdjson"]:
        pytest.skip("simdjson not installed")
    return request.param


def vectors(n: int, dim: int) -> np.ndarray:
    return expected_vectors([f"text {i}" for i in range(n)], dim)


def tei_body(vecs: np.ndarray) -> bytes:
    return orjson.dumps(vecs, option=orjson.OPT_SERIALIZE_NUMPY)


def openai_body(vecs: np.ndarray, encoding: str, shuffle: bool = False) -> bytes:
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
            if encoding == "base64"
            else v.tolist(),
        }
        for i, v in enumerate(vecs)
    ]
    if shuffle:
        random.Random(3).shuffle(data)
    return orjson.dumps({"object": "list", "data": data, "model": "m", "usage": {"prompt_tokens": 1}})


@pytest.mark.parametrize("dim", [1, 8, 384, 1024])
def test_tei_json_is_bit_exact(path, dim) -> None:
    v = vectors(33, dim)
    out = decode_embed_json(tei_body(v), 33, dim)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (33, dim)
    assert np.array_equal(out, v)
    assert np.array_equal(decode_embed_json(tei_body(v), 33, None), v)  # dimension learnt from the answer


def test_tei_json_accepts_integers_and_exponents(path) -> None:
    out = decode_embed_json(b"[[0, 1, -2.5e-3, 1E2]]", 1, 4)
    assert out.tolist() == [[0.0, 1.0, np.float32(-2.5e-3), 100.0]]


@pytest.mark.parametrize(
    "body,n,dim,why",
    [
        (b"[[0.1,0.2],[0.3,0.4]]", 3, 2, "expected 3 vectors"),
        (b"[[0.1,0.2],[0.3,0.4]]", 2, 3, "dimension 3"),
        (b"[[0.1,0.2,0.5],[0.3]]", 2, None, "lengths"),
        (b"[[0.1,0.2],[0.3,0.4]]", 1, 4, "expected 1 vectors"),  # same total as 1x4
        (b"[[0.1,null],[0.3,0.4]]", 2, 2, "non-finite"),
        (b'[[0.1,"x"],[0.3,0.4]]', 2, 2, "not numbers"),
        (b"[[[0.1,0.2]],[[0.3,0.4]]]", 2, None, ""),
        (b"[[0.1,0.2],[0.3,0.4]", 2, 2, "invalid JSON"),
        (b'{"error":"x"}', 1, 2, "expected a JSON array"),
        (b"[[1e999,0.2]]", 1, 2, ""),
        (b"[]", 0, 2, ""),
        (b"[[]]", 1, None, ""),
    ],
)
def test_tei_json_bad_answers_are_refused(path, body, n, dim, why) -> None:
    with pytest.raises(DecodeError, match=why or None):
        decode_embed_json(body, n, dim)


@pytest.mark.parametrize("dim", [384, 1024, 7])
def test_openai_base64_and_floats_are_bit_exact_and_reordered_by_index(path, dim) -> None:
    v = vectors(40, dim)
    for shuffle in (False, True):
        assert np.array_equal(decode_openai_base64(openai_body(v, "base64", shuffle), 40, dim), v)
        assert np.array_equal(decode_openai_floats(openai_body(v, "float", shuffle), 40, dim), v)
    # a server that ignores encoding_format and answers floats anyway
    assert np.array_equal(decode_openai_base64(openai_body(v, "float"), 40, dim), v)


def test_openai_bad_answers_are_refused(path) -> None:
    v = vectors(3, 4)
    good = orjson.loads(openai_body(v, "base64"))

    def body(mutate) -> bytes:
        obj = orjson.loads(orjson.dumps(good))
        mutate(obj)
        return orjson.dumps(obj)

    nan = v.copy()
    nan[1, 2] = np.nan
    cases = [
        (openai_body(v, "base64"), 4, 4, "expected 4 embeddings"),
        (openai_body(v, "base64"), 3, 5, "dimension 5"),
        (openai_body(nan, "base64"), 3, 4, "non-finite"),
        (body(lambda o: o["data"][1].update(index=7)), 3, 4, "indices"),
        (body(lambda o: o["data"][1].pop("index")), 3, 4, "index"),
        (body(lambda o: o["data"][1].update(embedding="###")), 3, 4, "base64"),
        (body(lambda o: o["data"][1].update(embedding=o["data"][1]["embedding"][:8])), 3, 4, "sizes"),
        (body(lambda o: o.pop("data")), 3, 4, "expected"),
        (b"not json", 3, 4, "invalid JSON"),
    ]
    for b, n, dim, why in cases:
        with pytest.raises(DecodeError, match=why):
            decode_openai_base64(b, n, dim)
    with pytest.raises(DecodeError, match="non-finite"):
        decode_openai_floats(openai_body(nan, "float"), 3, 4)
    with pytest.raises(DecodeError, match="one length"):
        decode_openai_floats(
            body(lambda o: [d.update(embedding=[0.5] * (i + 1)) for i, d in enumerate(o["data"])]), 3, None
        )


def test_fast_path_survives_an_error_in_the_middle(path) -> None:
    """A refused body must not leave the reused per-thread parser unusable for the next one."""
    v = vectors(4, 16)
    for _ in range(3):
        with pytest.raises(DecodeError):
            decode_embed_json(b'[[0.1,"x"],[0.3]]', 2, None)
        with pytest.raises(DecodeError):
            decode_openai_floats(orjson.dumps({"data": [{"index": 0, "embedding": [1, "x"]}]}), 1, None)
        assert np.array_equal(decode_embed_json(tei_body(v), 4, 16), v)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_pool_same_answers_and_errors_in_threads_and_processes(workers, monkeypatch) -> None:
    monkeypatch.setattr(decode, "PROCESS_MIN_BYTES", 0)  # small bodies would stay in a thread
    v = vectors(32, 64)

    async def go() -> None:
        pool = DecodePool(workers)
        await pool.start()
        try:
            outs = await asyncio.gather(
                *(
                    pool.decode(k, b, 32, 64)
                    for k, b in [
                        ("embed_json", tei_body(v)),
                        ("openai_base64", openai_body(v, "base64")),
                        ("openai_float", openai_body(v, "float")),
                    ]
                    * 3
                )
            )
            for out in outs:
                assert np.array_equal(out, v)
            with pytest.raises(DecodeError, match="expected 31 vectors"):
                await pool.decode("embed_json", tei_body(v), 31, 64)
            if workers > 1:
                assert pool.executor("embed_json") is not pool.executor("openai_base64")
        finally:
            pool.close()

    asyncio.run(go())


def test_decode_processes_die_with_a_killed_parent(tmp_path) -> None:
    script = textwrap.dedent("""
        import asyncio, sys, time
        from tweet_embed.backends.decode import DecodePool
        async def main():
            pool = DecodePool(2)
            await pool.start()
            print(" ".join(str(p) for p in pool._procs._processes), flush=True)
            time.sleep(600)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        children = [int(p) for p in line.split()]
        assert len(children) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        alive = children
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in children if _alive(p)]
        assert not alive, f"decode workers {alive} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_pool_bodies_larger_than_a_slot_are_pickled(monkeypatch) -> None:
    monkeypatch.setattr(decode, "SLOT_BYTES", 3000)
    monkeypatch.setattr(decode, "PROCESS_MIN_BYTES", 0)
    big, small = vectors(32, 64), vectors(1, 8)

    async def go() -> None:
        pool = DecodePool(2)
        await pool.start()
        try:
            assert all(s.size >= 3000 for s in pool._slots)
            outs = await asyncio.gather(
                pool.decode("embed_json", tei_body(big), 32, 64),  # body > slot: pickled
                pool.decode("embed_json", tei_body(small), 1, 8),  # through a slot
                pool.decode("openai_float", openai_body(small, "float"), 1, 8),
            )
            assert np.array_equal(outs[0], big) and np.array_equal(outs[1], small)
            assert np.array_equal(outs[2], small)
            names = [s.name for s in pool._slots]
        finally:
            pool.close()
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)

    asyncio.run(go())


def test_small_bodies_stay_in_a_thread_large_ones_go_to_a_process(monkeypatch) -> None:
    seen: list[str] = []

    async def go() -> None:
        pool = DecodePool(2)
        await pool.start()
        orig = pool._decode_in_slot

        async def spy(*a):
            seen.append("process")
            return await orig(*a)

        monkeypatch.setattr(pool, "_decode_in_slot", spy)
        try:
            small, large = vectors(2, 16), vectors(32, 1024)  # ~0.4 KB and ~400 KB of JSON
            assert np.array_equal(await pool.decode("embed_json", tei_body(small), 2, 16), small)
            assert seen == []
            assert np.array_equal(await pool.decode("embed_json", tei_body(large), 32, 1024), large)
            assert seen == ["process"]
        finally:
            pool.close()

    asyncio.run(go())
