"""OpenAI-compatible ``POST /v1/embeddings`` (TEI, vLLM, Infinity, OpenAI itself).

Asks for ``encoding_format: "base64"`` (little-endian float32 bytes: no float parsing at all) and falls back
to JSON floats when the server refuses it. Model: ``--model``, else the first of ``GET /v1/models``.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence

import numpy as np
import orjson

from .base import BackendError, BackendInfo, check_vectors
from .http import HTTPBackend
from .pool import BatchRefused, Endpoint

log = logging.getLogger("tweet_embed")

DEFAULT_BATCH = 64


def _ordered(data: list[dict], n: int) -> list[dict]:
    if len(data) != n:
        raise ValueError(f"expected {n} embeddings, got {len(data)}")
    if any(d.get("index") != i for i, d in enumerate(data)):
        data = sorted(data, key=lambda d: d["index"])
        if [d["index"] for d in data] != list(range(n)):
            raise ValueError("response indices do not match the inputs")
    return data


def decode_base64(body: bytes, n: int, dim: int | None) -> np.ndarray:
    data = _ordered(orjson.loads(body)["data"], n)
    raw = b"".join(base64.b64decode(d["embedding"]) for d in data)
    arr = np.frombuffer(raw, dtype="<f4")
    if n == 0 or arr.size % n:
        raise ValueError(f"base64 payload of {arr.size} floats does not split into {n} vectors")
    return check_vectors(arr.reshape(n, -1), n, dim)


def decode_floats(body: bytes, n: int, dim: int | None) -> np.ndarray:
    data = _ordered(orjson.loads(body)["data"], n)
    arr = np.asarray([d["embedding"] for d in data], dtype=np.float32)
    return check_vectors(arr, n, dim)


class OpenAIBackend(HTTPBackend):
    kind = "openai"
    encoding = "base64"

    @staticmethod
    def normalise_url(url: str) -> str:
        url = url.rstrip("/")
        if url.endswith("/embeddings"):
            return url
        if url.endswith("/v1"):
            return url + "/embeddings"
        return url + "/v1/embeddings"

    async def start(self) -> BackendInfo:
        if not self.model:
            listing = await self.get_json(self.urls[0].rsplit("/embeddings", 1)[0] + "/models")
            try:
                self.model = str(listing["data"][0]["id"])  # type: ignore[index]
            except (TypeError, KeyError, IndexError):
                raise BackendError("cannot learn the model from /v1/models; give it with --model") from None
        for ep in self.pool.endpoints:
            ep.capacity = 512
        probe = ["dimension probe"]
        try:
            vec = await self.request_vectors(probe, self._build(probe), decode_base64)
        except BatchRefused as exc:
            log.warning("server refused base64 encoding (%s); using JSON floats", exc)
            self.encoding = "float"
            vec = await self.request_vectors(probe, self._build(probe), decode_floats)
        except BackendError:
            raise
        batch = self.batch_size or DEFAULT_BATCH
        self.info_ = BackendInfo(
            kind="openai", model=self.model, dim=int(vec.shape[1]), normalize=self.normalize,
            max_batch=batch, max_in_flight=max(1, len(self.urls) * 512 // batch),
            extra={"encoding": self.encoding},
        )
        if not self.normalize:
            log.warning("OpenAI-compatible servers decide normalisation themselves; --no-normalize is not sent")
        return self.info_

    def _build(self, texts: Sequence[str]):  # type: ignore[no-untyped-def]
        payload = orjson.dumps({"input": list(texts), "model": self.model, "encoding_format": self.encoding})

        def build(ep: Endpoint) -> tuple[str, bytes]:
            return ep.url, payload

        return build

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        decode = decode_base64 if self.encoding == "base64" else decode_floats
        return await self.request_vectors(texts, self._build(texts), decode)
