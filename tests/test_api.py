"""embed_multi: records in, vectors out in order, with the prompt and dimensions given (real test server)."""

from __future__ import annotations

import numpy as np

from tweet_embed import embed_multi
from tweet_embed.backends import VectorOptions
from tweet_embed.testing.server import TEIServer, expected_vectors


def test_embed_multi_with_prompt_name_and_dimensions() -> None:
    records = [(f"id{i}", f"tweet number {i}") for i in range(30)]
    with TEIServer(dim=32, prompts={"document": "passage: "}, max_client_batch_size=8) as srv:
        opts = VectorOptions(prompt_name="document", dimensions=4)
        out = list(embed_multi(records, urls=[srv.url], window=10, options=opts))
        assert [i for i, _ in out] == [i for i, _ in records]
        got = np.stack([v for _, v in out])
        want = expected_vectors([f"passage: {t}" for _, t in records], 32, True, dimensions=4)
        np.testing.assert_array_equal(got, want)
        assert {(r.prompt_name, r.dimensions) for r in srv.received if r.route == "embed"} >= {
            ("document", 4)
        }
