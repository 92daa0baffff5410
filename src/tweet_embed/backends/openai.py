"""OpenAI-compatible ``POST /v1/embeddings`` (TEI, vLLM, Infinity, OpenAI itself).

Asks for ``encoding_format: "base64"`` (little-endian float32 bytes: no float parsing at all) and falls back
to JSON floats when the server refuses it. Model: ``--model``, else the first of ``GET /v1/models``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import orjson

from tweet_embed.backends.base import BackendError, BackendInfo
from tweet_embed.backends.decode import decode_openai_base64 as decode_base64  # noqa: F401 - earlier names
from tweet_embed.backends.decode import decode_openai_floats as decode_floats  # noqa: F401
from tweet_embed.backends.http import HTTPBackend, choose_batch
from tweet_embed.backends.pool import BatchRefused, Endpoint

log = logging.getLogger("tweet_embed")

DEFAULT_BATCH = 64  # when the server does not say (TEI's /info does)
DEFAULT_CAPACITY = 512  # inputs in flight per server


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

    @staticmethod
    def root_url(url: str) -> str:
        """``http://h:p/v1/embeddings`` → ``http://h:p`` (where TEI serves ``/info``)."""
        for suffix in ("/v1/embeddings", "/embeddings"):
            if url.endswith(suffix):
                return url[: -len(suffix)]
        return url

    async def start(self) -> BackendInfo:
        if self.options.prompt_name is not None:
            raise BackendError(
                "OpenAI-compatible servers take no prompt name (TEI's /v1/embeddings ignores it): give the "
                "prompt text with --prompt, or use the server's /embed with --tei-urls"
            )
        server_batch = None
        info_model = None
        for ep in self.pool.endpoints:
            ep.capacity = DEFAULT_CAPACITY
            # TEI serves /v1/embeddings too, with the limits of its /info (others answer 404: no limits known)
            info = await self.get_json(self.root_url(ep.url) + "/info")
            if isinstance(info, dict) and "max_client_batch_size" in info:
                ep.capacity = int(info.get("max_concurrent_requests") or DEFAULT_CAPACITY)
                mcb = info.get("max_client_batch_size")
                if isinstance(mcb, int) and mcb > 0:
                    server_batch = mcb if server_batch is None else min(server_batch, mcb)
                info_model = info_model or info.get("served_model_name") or info.get("model_id")
        if not self.model:
            listing = await self.get_json(self.urls[0].rsplit("/embeddings", 1)[0] + "/models")
            try:
                self.model = str(listing["data"][0]["id"])  # type: ignore[index]
            except (TypeError, KeyError, IndexError):
                if not info_model:
                    raise BackendError(
                        "cannot learn the model from /v1/models; give it with --model"
                    ) from None
                self.model = str(info_model)
        probe = ["dimension probe"]
        try:
            await self.request_vectors(probe, self._build(probe, False), "openai_base64")
        except BatchRefused as exc:
            log.warning("server refused base64 encoding (%s); using JSON floats", exc)
            self.encoding = "float"

        async def embed_probe(dims: bool) -> np.ndarray:
            kind = "openai_base64" if self.encoding == "base64" else "openai_float"
            return await self.request_vectors(probe, self._build(probe, dims), kind)

        dim = await self.probe_width(embed_probe, self.model)
        batch = choose_batch(self.batch_size, server_batch, DEFAULT_BATCH)
        capacity = sum(ep.capacity for ep in self.pool.endpoints)
        self.info_ = BackendInfo(
            kind="openai",
            model=self.model,
            dim=dim,
            normalize=self.normalize,
            max_batch=batch,
            max_in_flight=max(1, capacity // batch),
            extra={"encoding": self.encoding, **self.options.metadata()},
        )
        if not self.normalize:
            log.warning(
                "OpenAI-compatible servers decide normalisation themselves; --no-normalize is not sent"
            )
        return self.info_

    def _build(self, texts: Sequence[str], dims: bool = True):  # type: ignore[no-untyped-def]
        """The request body; a ``--prompt`` text goes before each input, ``dimensions`` is OpenAI's field
        (``dims``: send it; not while learning the model's full width)."""
        body: dict[str, object] = {
            "input": list(self.options.with_prompt(texts)),
            "model": self.model,
            "encoding_format": self.encoding,
        }
        if dims and self.options.dimensions is not None and self._wire_dim is None:
            body["dimensions"] = self.options.dimensions
        payload = orjson.dumps(body)

        def build(ep: Endpoint) -> tuple[str, bytes]:
            return ep.url, payload

        return build

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        kind = "openai_base64" if self.encoding == "base64" else "openai_float"
        return await self.request_vectors(texts, self._build(texts), kind)
