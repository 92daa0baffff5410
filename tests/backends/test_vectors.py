"""``--prompt``, ``--prompt-name`` and ``--dimensions``: what each backend sends (the real TEI-compatible test
server records every request), what it gets back, and the clear errors before any work."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from tweet_embed.backends import BackendError, make_backend
from tweet_embed.backends.vectors import VectorOptions, truncate
from tweet_embed.testing.server import TEIServer, expected_vectors

DIM = 32
TEXTS = [f"tweet {i}: rain, coffee and a derby ⚽" for i in range(40)]
PROMPTS = {"query": "query: ", "document": "passage: "}


def embed_all(backend, texts=TEXTS):
    async def go():
        info = await backend.start()
        try:
            step = info.max_batch
            parts = [await backend.embed(texts[i : i + step]) for i in range(0, len(texts), step)]
            return info, np.concatenate(parts)
        finally:
            await backend.close()

    return asyncio.run(go())


def embed_requests(srv: TEIServer) -> list:
    """The requests that were not the start-up probe (which carries the prompt too)."""
    return [r for r in srv.received if not r.texts[0].endswith("dimension probe")]


def test_tei_sends_prompt_name_and_dimensions() -> None:
    with TEIServer(dim=DIM, prompts=PROMPTS, max_client_batch_size=16) as srv:
        opts = VectorOptions(prompt_name="document", dimensions=8)
        info, vecs = embed_all(make_backend([srv.url], options=opts))
        assert info.dim == 8 and info.extra == {"prompt_name": "document", "dimensions": "8"}
        sent = embed_requests(srv)
        assert len(sent) == 3 and all(r.prompt_name == "document" and r.dimensions == 8 for r in sent)
        assert [t for r in sent for t in r.texts] == TEXTS  # the texts as given: TEI applies the prompt
        want = expected_vectors([f"passage: {t}" for t in TEXTS], DIM, True, dimensions=8)
        np.testing.assert_array_equal(vecs, want)
        # the probes: one at the full width (no dimensions), one with them
        probes = [r.dimensions for r in srv.received if r.texts == ("dimension probe",)]
        assert probes == [None, 8]


def test_tei_and_openai_send_a_prompt_text_before_each_input() -> None:
    with TEIServer(dim=DIM) as srv:
        info, vecs = embed_all(make_backend([srv.url], options=VectorOptions(prompt="query: ")))
        assert info.extra == {"prompt": "query: "}
        sent = embed_requests(srv)
        assert [t for r in sent for t in r.texts] == [f"query: {t}" for t in TEXTS]
        assert all(r.prompt_name is None and r.dimensions is None for r in sent)
        np.testing.assert_array_equal(vecs, expected_vectors([f"query: {t}" for t in TEXTS], DIM))
    with TEIServer(dim=DIM) as srv:
        opts = VectorOptions(prompt="query: ", dimensions=12)
        info, vecs = embed_all(make_backend(None, "m", openai_urls=[srv.url], options=opts))
        sent = [r for r in embed_requests(srv) if r.route == "openai"]
        assert [t for r in sent for t in r.texts] == [f"query: {t}" for t in TEXTS]
        assert all(r.dimensions == 12 and r.prompt_name is None for r in sent)
        assert info.dim == 12 and info.extra["prompt"] == "query: " and info.extra["dimensions"] == "12"
        np.testing.assert_allclose(
            vecs, expected_vectors([f"query: {t}" for t in TEXTS], DIM, dimensions=12), atol=1e-6
        )


def test_openai_refuses_a_prompt_name() -> None:
    with TEIServer(dim=DIM, prompts=PROMPTS) as srv:
        backend = make_backend(None, "m", openai_urls=[srv.url], options=VectorOptions(prompt_name="query"))
        with pytest.raises(BackendError, match="take no prompt name.*--prompt"):
            embed_all(backend)
        assert srv.received == []


def test_a_server_that_ignores_dimensions_is_cut_here_with_one_warning(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="tweet_embed")
    with TEIServer(dim=DIM, ignore_dimensions=True, max_client_batch_size=8) as srv:
        info, vecs = embed_all(make_backend([srv.url], options=VectorOptions(dimensions=10)))
        assert info.dim == 10 and vecs.shape == (len(TEXTS), 10)
        np.testing.assert_allclose(vecs, expected_vectors(TEXTS, DIM, True, dimensions=10), atol=1e-6)
        assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-6)
        assert caplog.text.count("ignores `dimensions`") == 1
    with TEIServer(dim=DIM, ignore_dimensions=True) as srv:  # not normalising: cut, not renormalised
        backend = make_backend([srv.url], normalize=False, options=VectorOptions(dimensions=10))
        _, vecs = embed_all(backend)
        np.testing.assert_array_equal(vecs, expected_vectors(TEXTS, DIM, False)[:, :10])


@pytest.mark.parametrize("openai", [False, True])
def test_more_dimensions_than_the_model_is_an_error_before_any_work(openai) -> None:
    with TEIServer(dim=DIM) as srv:
        opts = VectorOptions(dimensions=DIM + 1)
        backend = (
            make_backend(None, "m", openai_urls=[srv.url], options=opts)
            if openai
            else make_backend([srv.url], options=opts)
        )
        with pytest.raises(BackendError, match=f"--dimensions {DIM + 1} is more than model .* \\({DIM} dim"):
            embed_all(backend)
        # only the full-width probe went out
        assert all(r.dimensions is None and r.texts == ("dimension probe",) for r in srv.received)


def test_tei_unknown_prompt_name_names_the_known_ones() -> None:
    with TEIServer(dim=DIM, prompts=PROMPTS) as srv:
        backend = make_backend([srv.url], options=VectorOptions(prompt_name="passage"))
        with pytest.raises(BackendError, match=r"refused.*Available prompts: \[\"query\", \"document\"\]"):
            embed_all(backend)
        assert all(r.texts == ("dimension probe",) for r in srv.received)


def test_options_are_checked() -> None:
    with pytest.raises(BackendError, match="not both"):
        VectorOptions(prompt="query: ", prompt_name="query")
    with pytest.raises(BackendError, match="at least 1"):
        VectorOptions(dimensions=0)
    assert VectorOptions().metadata() == {}
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    np.testing.assert_allclose(truncate(v, 2, True), [[0.6, 0.8]])
    np.testing.assert_array_equal(truncate(v, 2, False), [[3.0, 4.0]])
