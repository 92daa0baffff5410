"""The OpenAI-compatible backend against the real local server's ``/v1/embeddings``: base64, the float
fallback, limits learnt from TEI's ``/info``, bad answers retried, and the API key (sent as a Bearer token,
refused without it, never written anywhere)."""

from __future__ import annotations

import asyncio
import glob
import logging
import os

import numpy as np
import pytest

from tweet_embed.backends import BackendError, BackendSpec, make_backend
from tweet_embed.backends.openai import OpenAIBackend
from tweet_embed.backends.tei import TEIBackend
from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets, write_jsonl

from conftest import read_shards, run_cli

DIM = 24
TEXTS = [f"tweet {i} about football and rain" for i in range(150)] + ["", " ", "émoji 🔥 ✈️"]
KEY = "sk-test-7c1f0a9e5d4b3a29"


async def embed_all(backend, texts):
    try:
        info = await backend.start()
        vecs = await asyncio.gather(
            *(backend.embed(texts[i : i + info.max_batch]) for i in range(0, len(texts), info.max_batch))
        )
        return info, np.concatenate(vecs)
    finally:
        await backend.close()


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_base64_vectors_exact_model_and_batch_from_info(workers) -> None:
    with TEIServer(dim=DIM, max_client_batch_size=20, model_id="org/model-x") as srv:
        backend = OpenAIBackend([srv.openai_url], workers=workers)
        info, vecs = asyncio.run(embed_all(backend, TEXTS))
        assert info.kind == "openai" and info.extra["encoding"] == "base64"
        assert info.model == "org/model-x" and info.dim == DIM and info.max_batch == 20
        np.testing.assert_array_equal(vecs, expected_vectors(TEXTS, DIM))
        c = srv.counters
        assert c["max_batch"] <= 20 and c["422"] == 0 and c["ok"] == c["requests"]


def test_float_fallback_when_base64_is_refused(caplog) -> None:
    with TEIServer(dim=DIM, supports_base64=False) as srv:
        backend = make_backend(openai_urls=[srv.url + "/v1"], model="given/model", workers=2)
        with caplog.at_level(logging.WARNING, logger="tweet_embed"):
            info, vecs = asyncio.run(embed_all(backend, TEXTS))
        assert info.extra["encoding"] == "float" and info.model == "given/model"
        np.testing.assert_array_equal(vecs, expected_vectors(TEXTS, DIM))
        assert "refused base64" in caplog.text
        assert srv.counters["422"] == 1  # only the probe was refused


def test_bad_answers_are_retried_not_written() -> None:
    with TEIServer(dim=DIM) as srv:
        backend = OpenAIBackend([srv.openai_url])

        async def go():
            await backend.start()
            srv.queue_faults("nan", "bad_dim", "bad_count", "ok")
            try:
                return await backend.embed(TEXTS[:10]), backend.stats()
            finally:
                await backend.close()

        vecs, stats = asyncio.run(go())
        np.testing.assert_array_equal(vecs, expected_vectors(TEXTS[:10], DIM))
        assert stats["retry_bad_answer"] == 3


def test_url_forms() -> None:
    n = OpenAIBackend.normalise_url
    assert (
        n("http://h:1/v1")
        == n("http://h:1/v1/")
        == n("http://h:1/v1/embeddings")
        == "http://h:1/v1/embeddings"
    )
    assert n("http://h:1") == "http://h:1/v1/embeddings"
    assert OpenAIBackend.root_url("http://h:1/v1/embeddings") == "http://h:1"
    assert isinstance(make_backend(["http://h:1/v1"]), OpenAIBackend)
    assert isinstance(make_backend(["http://h:1"]), TEIBackend)
    with pytest.raises(BackendError, match="mixing"):
        make_backend(["http://h:1/embed"], openai_urls=["http://h:2/v1"])


@pytest.mark.parametrize("kind", ["openai", "tei"])
def test_bearer_key_is_sent_and_required(kind) -> None:
    with TEIServer(dim=DIM, api_key=KEY) as srv:
        url = srv.openai_url if kind == "openai" else srv.embed_url
        info, vecs = asyncio.run(embed_all(make_backend([url], api_key=KEY), TEXTS[:40]))
        np.testing.assert_array_equal(vecs, expected_vectors(TEXTS[:40], DIM))
        srv.reset_counters()
        for key in (None, "wrong-key"):
            with pytest.raises(BackendError, match="authentication failed") as err:
                asyncio.run(embed_all(make_backend([url], api_key=key, model="m"), TEXTS[:5]))
            assert KEY not in str(err.value)
        assert srv.counters["401"] >= 2 and srv.counters["ok"] == 0


def test_key_never_in_repr() -> None:
    backend = make_backend(["http://h:1/v1"], api_key=KEY)
    spec = BackendSpec(openai_urls=("http://h:1/v1",), api_key=KEY)
    assert KEY not in repr(backend) and KEY not in repr(spec) and KEY not in str(vars(spec).get("urls"))


def _all_bytes(root: str) -> bytes:
    out = []
    for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) + glob.glob(
        os.path.join(root, "**", ".*"), recursive=True
    ):
        if os.path.isfile(p):
            with open(p, "rb") as fh:
                out.append(fh.read())
    return b"".join(out)


@pytest.mark.parametrize("flag", ["--openai-urls", "--tei-urls"])
def test_cli_with_key_from_env_never_writes_it(tmp_path, flag) -> None:
    path = str(tmp_path / "in.jsonl")
    write_jsonl(path, 1200, seed=5)
    records = list(synth_tweets(1200, seed=5))
    with TEIServer(dim=DIM, api_key=KEY) as srv:
        url = srv.openai_url if flag == "--openai-urls" else srv.embed_url
        work = str(tmp_path / "w")
        r = run_cli(
            "-v",
            "embed",
            path,
            flag,
            url,
            "--work-dir",
            work,
            "--chunk-size",
            "500",
            "--workers",
            "2",
            env={"TWEET_EMBED_API_KEY": KEY, "OPENAI_API_KEY": ""},
        )
        assert r.returncode == 0, r.stderr
        assert KEY not in r.stdout and KEY not in r.stderr
        assert KEY.encode() not in _all_bytes(work)
        ids, vecs, _ = read_shards(os.path.join(work, "shards"), DIM)
        assert ids == [i for i, _ in records]
        np.testing.assert_array_equal(vecs, expected_vectors([t for _, t in records], DIM))
        # the same run with a wrong key: a clear error, exit 3, the key in no message
        r = run_cli(
            "embed",
            path,
            flag,
            url,
            "--work-dir",
            str(tmp_path / "w2"),
            env={"TWEET_EMBED_API_KEY": "", "OPENAI_API_KEY": "wrong-" + KEY},
        )
        assert r.returncode == 3 and "authentication failed" in r.stderr
        assert KEY not in r.stderr and KEY not in r.stdout
