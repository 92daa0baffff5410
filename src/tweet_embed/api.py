"""The library entry point for code that already holds its records: an iterable of ``(id, text)`` in,
``(id, vector)`` out, in order, memory bounded by one window of ``window`` records (as ``llm``'s
``embed_multi``). For files and resumable runs use :func:`tweet_embed.embed.runner.run_embed`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from itertools import islice

import numpy as np

from tweet_embed.backends import VectorOptions, make_backend
from tweet_embed.backends.base import Backend
from tweet_embed.input.records import clean_text


def embed_multi(
    records: Iterable[tuple[str, str]],
    backend: Backend | None = None,
    *,
    urls: list[str] | None = None,
    model: str | None = None,
    window: int = 10_000,
    options: VectorOptions | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(id, float32 vector)`` for each record; a text the server refuses raises ``BatchRefused``.
    ``options``: prompt and dimensions for the backend built here from ``urls`` / ``model``."""
    from tweet_embed.embed.worker import embed_texts

    backend = backend or make_backend(urls, model, options=options)
    loop = asyncio.new_event_loop()
    try:
        info = loop.run_until_complete(backend.start())
        it = iter(records)
        while block := list(islice(it, window)):
            ids = [str(r[0]) for r in block]
            texts = [clean_text(r[1]) for r in block]
            vectors, refused = loop.run_until_complete(embed_texts(backend, texts, info))
            if refused:
                from tweet_embed.backends.pool import BatchRefused

                i, reason = next(iter(refused.items()))
                raise BatchRefused(f"record {ids[i]!r}: {reason}")
            yield from zip(ids, vectors, strict=True)
    finally:
        loop.run_until_complete(backend.close())
        loop.close()
