"""The TEI ``/embed`` backend against the real local server: exact vectors through every decode pool size,
bad answers retried, and a finished run that is resumed sends nothing at all."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tweet_embed.backends import BackendSpec
from tweet_embed.backends.tei import TEIBackend
from tweet_embed.embed.chunks import WorkDirs
from tweet_embed.embed.runner import EmbedOptions, run_embed
from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import write_jsonl

DIM = 32
TEXTS = [f"tweet {i}: coffee, rain and a 🔥 derby" for i in range(300)]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_vectors_exact_with_every_pool_size(workers, monkeypatch) -> None:
    from tweet_embed.backends import decode

    monkeypatch.setattr(decode, "PROCESS_MIN_BYTES", 0)
    with TEIServer(dim=DIM, max_client_batch_size=25) as srv:
        backend = TEIBackend([srv.url], workers=workers, normalize=False)

        async def go():
            info = await backend.start()
            try:
                parts = await asyncio.gather(
                    *(
                        backend.embed(TEXTS[i : i + info.max_batch])
                        for i in range(0, len(TEXTS), info.max_batch)
                    )
                )
                return info, np.concatenate(parts)
            finally:
                await backend.close()

        info, vecs = asyncio.run(go())
        assert info.max_batch == 25 and info.dim == DIM and info.model == srv.model_id
        np.testing.assert_array_equal(vecs, expected_vectors(TEXTS, DIM, normalize=False))
        assert srv.counters["max_batch"] == 25


def test_bad_answers_are_retried_through_the_process_pool(monkeypatch) -> None:
    from tweet_embed.backends import decode

    monkeypatch.setattr(decode, "PROCESS_MIN_BYTES", 0)  # these small answers would stay in a thread
    with TEIServer(dim=DIM) as srv:
        backend = TEIBackend([srv.embed_url], workers=2)

        async def go():
            await backend.start()
            srv.queue_faults("nan", "bad_dim", "bad_count", "ok")
            try:
                return await backend.embed(TEXTS[:7]), backend.stats()
            finally:
                await backend.close()

        vecs, stats = asyncio.run(go())
        np.testing.assert_array_equal(vecs, expected_vectors(TEXTS[:7], DIM))
        assert stats["retry_bad_answer"] == 3


def test_resuming_a_finished_run_sends_nothing(tmp_path) -> None:
    path = str(tmp_path / "in.jsonl")
    write_jsonl(path, 2000, seed=11)
    with TEIServer(dim=DIM) as srv:
        spec = BackendSpec(urls=(srv.url,), workers=2)
        opts = EmbedOptions(
            inputs=[path],
            dirs=WorkDirs.from_options(str(tmp_path / "w"), None, None, None),
            chunk_lines=100,
            log_interval=60,
        )
        first = run_embed(opts, spec)
        assert first.rows == 2000 and first.chunks_done_now == 20
        srv.reset_counters()
        again = run_embed(opts, spec)
        assert again.chunks_done_now == 0 and again.chunks_skipped == 20 and again.rows == 0
        c = srv.counters
        assert c["requests"] == 0 and c["ok"] == 0, c


def test_chunk_vectors_are_freed_without_the_cyclic_gc() -> None:
    """Peak RSS must not grow with the input: a finished chunk's vectors go as soon as they are dropped."""
    import gc
    import weakref

    from tweet_embed.embed.worker import embed_texts

    with TEIServer(dim=DIM, max_client_batch_size=8) as srv:
        backend = TEIBackend([srv.url], workers=0)

        async def go():
            info = await backend.start()
            try:
                out, refused = await embed_texts(backend, TEXTS[:50], info)
                return weakref.ref(out), refused
            finally:
                await backend.close()

        gc.disable()
        try:
            ref, refused = asyncio.run(go())
            assert not refused
            assert ref() is None, "the vectors are still held by a reference cycle"
        finally:
            gc.enable()
