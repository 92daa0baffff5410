"""Hugging Face text-embeddings-inference ``POST /embed`` (any TEI version in the wild).

Reads ``/info`` of every server for ``max_client_batch_size`` and ``max_concurrent_requests`` (inputs in
flight), sends ``truncate: true`` and ``normalize``, and learns the dimension from a one-text probe.
Batches a server refuses as too large (422 since TEI 1.9.0, 413 before; 413 plain text for a body over its
payload limit) are split by the run loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import orjson

from tweet_embed.backends.base import BackendError, BackendInfo
from tweet_embed.backends.http import HTTPBackend, choose_batch
from tweet_embed.backends.pool import Endpoint, redact_url

log = logging.getLogger("tweet_embed")

DEFAULT_BATCH = 32  # TEI's default max_client_batch_size
DEFAULT_CONCURRENCY = 512  # TEI's default max_concurrent_requests


class TEIBackend(HTTPBackend):
    kind = "tei"

    @staticmethod
    def normalise_url(url: str) -> str:
        url = url.rstrip("/")
        return url if url.endswith("/embed") else url + "/embed"

    @staticmethod
    def base_url(url: str) -> str:
        return url[: -len("/embed")]

    async def start(self) -> BackendInfo:
        models: dict[str, str] = {}
        server_batch = None
        infos = [await self.get_json(self.base_url(ep.url) + "/info") for ep in self.pool.endpoints]
        if not any(isinstance(i, dict) for i in infos):
            # No server answered: down, or still loading its model. Wait for one through the pool (backoff up
            # to --max-retry-time, then an error naming each endpoint and its last error), then ask again.
            await self.request_vectors(
                ["dimension probe"], self._build(["dimension probe"], False), "embed_json"
            )
            infos = [await self.get_json(self.base_url(ep.url) + "/info") for ep in self.pool.endpoints]
        for ep, info in zip(self.pool.endpoints, infos, strict=True):
            if isinstance(info, dict):
                ep.capacity = int(info.get("max_concurrent_requests") or DEFAULT_CONCURRENCY)
                mcb = info.get("max_client_batch_size")
                if isinstance(mcb, int) and mcb > 0:
                    server_batch = mcb if server_batch is None else min(server_batch, mcb)
                mid = info.get("model_id") or info.get("served_model_name")
                if mid:
                    models[ep.url] = str(mid)
            else:
                ep.capacity = DEFAULT_CONCURRENCY
                log.warning("%s: no /info; assuming TEI defaults", ep.name)
        if len(set(models.values())) > 1:
            listing = "\n".join(f"  {redact_url(u)}: {m}" for u, m in models.items())
            raise BackendError(f"the servers do not serve the same model:\n{listing}")
        model = self.model or next(iter(models.values()), None)
        if model is None:
            raise BackendError("cannot learn the model id from /info; give it with --model")
        if self.model and models and self.model not in models.values():
            log.warning(
                "--model %s given, but the servers report %s", self.model, next(iter(models.values()))
            )
        batch = choose_batch(self.batch_size, server_batch, DEFAULT_BATCH)
        probe = ["dimension probe"]

        async def embed_probe(dims: bool) -> np.ndarray:
            return await self.request_vectors(probe, self._build(probe, dims), "embed_json")

        dim = await self.probe_width(embed_probe, model)
        capacity = sum(ep.capacity for ep in self.pool.endpoints)
        self.info_ = BackendInfo(
            kind="tei",
            model=model,
            dim=dim,
            normalize=self.normalize,
            max_batch=batch,
            max_in_flight=max(1, capacity // max(1, batch)),
            extra=self.options.metadata(),
        )
        return self.info_

    def _build(self, texts: Sequence[str], dims: bool = True):  # type: ignore[no-untyped-def]
        """The request body: ``prompt_name`` and ``dimensions`` are TEI's own fields (``dims``: send
        ``dimensions``; not while learning the model's full width), a ``--prompt`` text goes before each input."""
        opts = self.options
        body: dict[str, object] = {
            "inputs": list(opts.with_prompt(texts)),
            "truncate": True,
            "normalize": self.normalize,
        }
        if opts.prompt_name is not None:
            body["prompt_name"] = opts.prompt_name
        if dims and opts.dimensions is not None and self._wire_dim is None:
            body["dimensions"] = opts.dimensions
        payload = orjson.dumps(body)

        def build(ep: Endpoint) -> tuple[str, bytes]:
            return ep.url, payload

        return build

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await self.request_vectors(texts, self._build(texts), "embed_json")
